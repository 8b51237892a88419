//! Metrics plugins define (`proxy_define_metric` and friends), rendered in `/metrics`.

use super::*;

/// Metrics plugins define (proxy_define_metric), rendered in /metrics.
#[derive(Default)]
pub struct PluginMetrics {
    inner: Mutex<MetricsInner>,
}

#[derive(Default)]
pub(super) struct MetricsInner {
    by_name: HashMap<(String, String), u32>,
    list: Vec<Arc<PluginMetric>>,
}

pub struct PluginMetric {
    pub plugin: String,
    pub name: String,
    pub kind: i32,
    pub value: AtomicI64,
    pub count: AtomicU64,
}

impl PluginMetrics {
    pub(super) fn define(&self, plugin: &str, name: &str, kind: i32) -> u32 {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (plugin.to_string(), name.to_string());
        if let Some(id) = g.by_name.get(&key) {
            return *id;
        }
        g.list.push(Arc::new(PluginMetric {
            plugin: plugin.to_string(),
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            count: AtomicU64::new(0),
        }));
        let id = g.list.len() as u32;
        g.by_name.insert(key, id);
        id
    }

    pub(super) fn metric(&self, id: u32) -> Option<Arc<PluginMetric>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.list.get((id as usize).checked_sub(1)?).cloned()
    }

    pub(super) fn increment(&self, id: u32, by: i64) -> abi::Status {
        match self.metric(id) {
            Some(m) if m.kind != abi::METRIC_HISTOGRAM => {
                m.value.fetch_add(by, Relaxed);
                abi::Status::Ok
            }
            Some(_) => abi::Status::BadArgument,
            None => abi::Status::NotFound,
        }
    }

    pub(super) fn record(&self, id: u32, v: u64) -> abi::Status {
        match self.metric(id) {
            Some(m) if m.kind == abi::METRIC_HISTOGRAM => {
                m.value.fetch_add(v as i64, Relaxed);
                m.count.fetch_add(1, Relaxed);
                abi::Status::Ok
            }
            Some(m) => {
                m.value.store(v as i64, Relaxed);
                abi::Status::Ok
            }
            None => abi::Status::NotFound,
        }
    }

    pub(super) fn get(&self, id: u32) -> Option<u64> {
        self.metric(id).map(|m| m.value.load(Relaxed) as u64)
    }

    pub fn all(&self) -> Vec<Arc<PluginMetric>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .list
            .clone()
    }
}
