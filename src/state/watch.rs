//! The reload trigger: SIGHUP, and (when `server.watch_config`) a poll of the config file and
//! certificate files' fingerprints every `server.watch_interval`. Polling follows symlink
//! swaps (certbot, Kubernetes secrets) that inotify on the original path would miss.

use super::{fingerprint, State};
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

    fn reload(&self, why: &str) {
        match self.state.reload() {
            Ok(generation) => tracing::info!(trigger = why, generation, "configuration reloaded"),
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
        let mut last = fingerprint(&cfg);
        let mut tick = tokio::time::interval(cfg.server.watch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP");
                    last = fingerprint(&self.state.snapshot().config);
                }
                _ = tick.tick() => {
                    let cfg = self.state.snapshot().config.clone();
                    if !cfg.server.watch_config {
                        continue;
                    }
                    let now = fingerprint(&cfg);
                    if now != last {
                        self.reload("file change");
                        // the new config may watch other files
                        last = fingerprint(&self.state.snapshot().config);
                    }
                }
            }
        }
    }
}
