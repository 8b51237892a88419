//! The reload trigger: SIGHUP, and (when `server.watch_config`) a poll of the config file and
//! certificate files' fingerprints every `server.watch_interval`. Polling follows symlink
//! swaps (certbot, Kubernetes secrets) that inotify on the original path would miss.

use super::{fingerprint, Fingerprint, State};
use crate::config::Config;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

pub struct Reloader {
    state: Arc<State>,
}

impl Reloader {
    pub fn new(state: Arc<State>) -> Self {
        Reloader { state }
    }

    /// Reload, and return what to compare the next poll with: the stamps taken before the
    /// reload read the files (`before`), so a file that changes while it runs is reloaded at
    /// the next poll instead of being taken as seen.
    fn reload(&self, why: &str, before: Fingerprint) -> Fingerprint {
        self.apply(why);
        seen_after_reload(before, &self.state.snapshot().config)
    }

    fn apply(&self, why: &str) {
        match self.state.reload() {
            Ok(generation) => {
                tracing::info!(trigger = why, generation, "configuration reloaded");
                for w in self.state.snapshot().warnings() {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => tracing::error!(
                trigger = why,
                "reload rejected, the previous configuration keeps serving: {}",
                e.to_string().trim_end()
            ),
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload by file change only");
                None
            }
        };
        let cfg = self.state.snapshot().config.clone();
        // from the stamps of the first build, not of now: the service may start after a
        // file changed
        let mut last = self.state.first_seen.clone();
        let mut tick = tokio::time::interval(cfg.server.watch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    let before = fingerprint(&self.state.snapshot().config);
                    last = self.reload("SIGHUP", before);
                }
                _ = tick.tick() => {
                    let cfg = self.state.snapshot().config.clone();
                    if !cfg.server.watch_config {
                        continue;
                    }
                    let now = fingerprint(&cfg);
                    if now != last {
                        last = self.reload("file change", now);
                    }
                }
            }
        }
    }
}

/// The stamps to remember after a reload: for every file `cfg` (the configuration now in
/// force) watches, the stamp taken before the reload when there is one; files it newly
/// watches are stamped now.
fn seen_after_reload(before: Fingerprint, cfg: &Config) -> Fingerprint {
    let before: std::collections::HashMap<_, _> = before.into_iter().collect();
    fingerprint(cfg)
        .into_iter()
        .map(|(path, now)| {
            let seen = before.get(&path).cloned().unwrap_or(now);
            (path, seen)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that lands while a reload runs is not taken as seen: the next poll differs.
    #[test]
    fn a_change_during_a_reload_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let text = "[[listener]]\naddress = \"127.0.0.1:1\"\n[[vhost]]\nnames = [\"a.test\"]\n\
                    [[vhost.route]]\npath = \"/\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:2\"]\n";
        std::fs::write(&path, text).unwrap();
        let cfg = Config::load(&path).unwrap();
        let before = fingerprint(&cfg);
        // the reload has read the file; then it changes (another length, so any clock will do)
        std::fs::write(&path, format!("{text}# changed\n")).unwrap();
        let seen = seen_after_reload(before.clone(), &cfg);
        assert_eq!(seen, before);
        assert_ne!(fingerprint(&cfg), seen, "the next poll sees the change");
    }
}
