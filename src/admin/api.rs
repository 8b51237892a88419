//! JSON views of the live state, `/explain`, and the `/metrics` text.

use super::Shown;
use super::{json, query_params};
use crate::clock::now_ms;
use crate::config::Balance;
use crate::discovery::consul::WatchTable;
use crate::metrics::{esc, family, single, Metrics};
use crate::routing::{normalize_host, Lookup};
use crate::state::{Snapshot, State};
use crate::upstream::Pool;
use http::{Response, StatusCode};
use serde_json::{json, Value};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

pub(super) fn status(state: &State, snap: &Snapshot, shown: &Shown) -> Value {
    let m = &state.lasting.metrics;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "started_at_unix": state.started_unix,
        "snapshot": {
            "generation": snap.generation,
            "built_at_unix": snap.built_at_unix,
        },
        "config": {
            "source": snap.config.source.display().to_string(),
            "reloads_ok": m.reloads_ok.load(Relaxed),
            "reloads_failed": m.reloads_failed.load(Relaxed),
            "last_reload": state.last_reload(),
        },
        "active_requests": shown.active.count(),
        "vhosts": snap.vhosts.len(),
        "pools": snap.pools.len(),
        "ports": snap.ports.iter().map(port_json).collect::<Vec<_>>(),
        // Sources and subsystems not built yet report themselves as such.
        "consul": consul_status(snap, &shown.watches, m),
        "failover": match shown.failover.get() {
            Some(st) => json!({ "configured": true, "status": st }),
            None => json!({ "configured": snap.config.failover.is_some(), "state": "standalone" }),
        },
    })
}

/// A service port: where it listens, what it carries, its pools and counters.
fn port_json(p: &crate::state::Port) -> Value {
    let m = &p.metrics;
    json!({
        "name": p.spec.name,
        "address": p.spec.address.to_string(),
        "protocol": p.spec.protocol.name(),
        "pool": p.spec.pool,
        "sni": p.spec.sni.iter().map(|r| json!({ "names": r.names, "pool": r.pool })).collect::<Vec<_>>(),
        "source": p.spec.source,
        "open": m.open.load(Relaxed),
        "total": m.total.load(Relaxed),
        "received_bytes": m.bytes_in.load(Relaxed),
        "sent_bytes": m.bytes_out.load(Relaxed),
        "connect_failures": m.connect_failures.load(Relaxed),
        "refused": m.refused.load(Relaxed),
    })
}

fn consul_status(snap: &Snapshot, watches: &WatchTable, m: &Metrics) -> Value {
    let configured =
        snap.config.consul.tag_routes || snap.pools.iter().any(|p| p.spec.consul.is_some());
    if !configured {
        return json!({ "configured": false });
    }
    let now = crate::clock::unix_secs();
    let watches: Vec<Value> = watches
        .all()
        .into_iter()
        .map(|h| {
            json!({
                "service": h.service,
                "healthy": h.consecutive_failures == 0 && h.last_success_unix > 0,
                "index": h.index,
                "last_success_unix": h.last_success_unix,
                "stale_seconds": if h.last_success_unix == 0 { Value::Null } else { json!(now.saturating_sub(h.last_success_unix)) },
                "consecutive_failures": h.consecutive_failures,
                "last_error": h.last_error,
            })
        })
        .collect();
    json!({
        "configured": true,
        "address": snap.config.consul.address,
        "errors_total": m.consul_errors.load(Relaxed),
        "guarded_total": m.consul_guarded.load(Relaxed),
        "tag_routes": snap.config.consul.tag_routes,
        "route_conflicts": snap.route_conflicts,
        "watches": watches,
    })
}

pub(super) fn routes(snap: &Snapshot) -> Value {
    Value::Array(
        snap.vhosts
            .iter()
            .enumerate()
            .map(|(vi, v)| {
                json!({
                    "vhost": v.label,
                    "names": v.names,
                    "default": v.default,
                    "redirect_https": v.redirect_https,
                    "source": v.source,
                    "routes": snap.routes_of(vi).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn backends(pool: &Pool) -> Vec<Value> {
    let now = now_ms();
    pool.backends
        .iter()
        .map(|b| {
            let until = b.state.ejected_until_ms();
            let check = pool.spec.check.as_ref().map(|_| {
                let last = b
                    .state
                    .last_probe
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                json!({
                    "up": b.state.check_up(),
                    "last": last.as_ref().map(|(_, found)| found.clone()),
                    "last_at_unix_ms": last.map(|(at, _)| at),
                })
            });
            json!({
                "check": check,
                "address": b.address.to_string(),
                "weight": b.weight,
                "available": b.state.is_available(now),
                "ejected_for_ms": until.saturating_sub(now),
                "inflight": b.state.inflight.load(Relaxed),
                "consecutive_failures": b.state.consecutive_failures(),
                "ejections_total": b.state.ejections_total.load(Relaxed),
            })
        })
        .collect()
}

fn balance(b: Balance) -> &'static str {
    match b {
        Balance::RoundRobin => "round_robin",
        Balance::PowerOfTwo => "p2c",
    }
}

fn pool_json(pool: &Pool, watches: &WatchTable) -> Value {
    json!({
        "name": pool.name,
        "source": match &pool.spec.consul {
            Some(key) => match watches.index(key) {
                Some(i) => format!("consul service {key} at index {i}"),
                None => format!("consul service {key} (no answer yet)"),
            },
            None => "file".to_string(),
        },
        "datacenter": datacenter_json(pool),
        "balance": balance(pool.spec.balance),
        "protocol": pool.spec.protocol.name(),
        "tls": tls_json(pool),
        "max_connections": pool.spec.max_connections,
        "max_streams": pool.spec.protocol.h2().then_some(pool.spec.max_streams),
        "retries": pool.spec.retries,
        "max_fails": pool.spec.health.max_fails,
        "backends": backends(pool),
    })
}

/// How a TLS pool verifies its backends and which client certificate it shows (else null).
fn tls_json(pool: &Pool) -> Value {
    let (Some(t), Some(m)) = (&pool.spec.tls, &pool.tls) else {
        return Value::Null;
    };
    json!({
        "server_name": t.server_name.clone().or_else(|| pool.spec.consul.as_ref().map(|k| k.service.clone())),
        "ca": t.ca.as_ref().map_or("system roots".to_string(), |p| p.display().to_string()),
        "verify": t.verify,
        "client_cert": t.client_cert.as_ref().map(|(c, _)| c.display().to_string()),
        "client_cert_not_after_unix": m.client_not_after,
    })
}

/// Which datacenter serves a Consul pool with failover datacenters, and why (else null).
fn datacenter_json(pool: &Pool) -> Value {
    if pool.spec.failover.is_empty() {
        return Value::Null;
    }
    let own = pool
        .spec
        .consul
        .as_ref()
        .and_then(|k| k.datacenter.clone())
        .unwrap_or_else(|| "local".to_string());
    match &pool.spec.serving {
        Some((dc, why)) => {
            json!({ "serving": dc, "own": own, "failover": pool.spec.failover, "reason": why })
        }
        None => json!({ "serving": own, "own": own, "failover": pool.spec.failover }),
    }
}

pub(super) fn pools(snap: &Snapshot, watches: &WatchTable) -> Value {
    Value::Array(snap.pools.iter().map(|p| pool_json(p, watches)).collect())
}

pub(super) fn plugins(snap: &Snapshot) -> Value {
    Value::Array(
        snap.plugins
            .values()
            .map(|p| {
                let used_by: Vec<String> = snap
                    .vhosts
                    .iter()
                    .enumerate()
                    .flat_map(|(vi, v)| {
                        snap.routes_of(vi)
                            .filter(|r| {
                                v.plugins.contains(&p.spec.name) || r.plugins.contains(&p.spec.name)
                            })
                            .map(move |r| format!("{}{}", v.label, r.path))
                    })
                    .collect();
                let mut v = serde_json::to_value(p.status()).unwrap_or(Value::Null);
                v["routes"] = json!(used_by);
                v["loaded_at_unix"] = json!(p.loaded_unix);
                v
            })
            .collect(),
    )
}

/// Plugin families: calls, faults by kind, instance starts, local answers, callouts, and
/// the metrics plugins define themselves.
fn plugin_metrics(out: &mut String, snap: &Snapshot, host: &crate::wasm::Host) {
    if snap.plugins.is_empty() {
        return;
    }
    type Pick = fn(&crate::wasm::PluginStats) -> &std::sync::atomic::AtomicU64;
    let families: [(&str, &str, Pick); 5] = [
        (
            "tollgate_plugin_calls_total",
            "Callbacks called into each plugin.",
            |s| &s.calls,
        ),
        (
            "tollgate_plugin_instances_started_total",
            "Plugin instances started (a fault discards one; the next start replaces it).",
            |s| &s.instances_started,
        ),
        (
            "tollgate_plugin_local_responses_total",
            "Requests a plugin answered itself.",
            |s| &s.local_responses,
        ),
        (
            "tollgate_plugin_callouts_total",
            "HTTP callouts plugins made.",
            |s| &s.callouts,
        ),
        (
            "tollgate_plugin_callout_failures_total",
            "HTTP callouts that failed (no answer given to the plugin).",
            |s| &s.callout_failures,
        ),
    ];
    for (name, help, pick) in families {
        family(out, name, "counter", help);
        for p in snap.plugins.values() {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\"}} {}",
                esc(&p.spec.name),
                pick(&p.stats).load(Relaxed)
            );
        }
    }
    family(
        out,
        "tollgate_plugin_faults_total",
        "counter",
        "Plugin failures by kind: deadline (CPU), trap (panic, out of memory, bad pointer), lost (instance gone or restarting), stuck (paused with nothing pending).",
    );
    for p in snap.plugins.values() {
        let s = &p.stats;
        for (kind, c) in [
            ("deadline", &s.faults_deadline),
            ("trap", &s.faults_trap),
            ("lost", &s.faults_lost),
            ("stuck", &s.faults_stuck),
        ] {
            let _ = writeln!(
                out,
                "tollgate_plugin_faults_total{{plugin=\"{}\",kind=\"{kind}\"}} {}",
                esc(&p.spec.name),
                c.load(Relaxed)
            );
        }
    }
    let defined = host.metrics.all();
    if !defined.is_empty() {
        family(
            out,
            "tollgate_plugin_metric",
            "untyped",
            "Metrics plugins define (proxy_define_metric): counters and gauges as values, histograms as sums.",
        );
        for m in defined {
            let _ = writeln!(
                out,
                "tollgate_plugin_metric{{plugin=\"{}\",name=\"{}\"}} {}",
                esc(&m.plugin),
                esc(&m.name),
                m.value.load(Relaxed)
            );
        }
    }
}

pub(super) fn certs(snap: &Snapshot) -> Value {
    let now = crate::clock::unix_secs() as i64;
    Value::Array(
        snap.certs
            .infos
            .iter()
            .map(|c| {
                let acme = snap
                    .config
                    .acme
                    .as_ref()
                    .is_some_and(|a| c.source.starts_with(a.certs_dir()));
                json!({
                    "names": c.names,
                    "not_before_unix": c.not_before,
                    "not_after_unix": c.not_after,
                    "days_left": (c.not_after - now).div_euclid(86_400),
                    "source": c.source.display().to_string(),
                    "issuer": if acme {
                        "acme"
                    } else if c.source.to_string_lossy().starts_with("consul:") {
                        "consul"
                    } else {
                        "file"
                    },
                    // ACME renews at 2/3 of the lifetime
                    "renew_at_unix": acme.then(|| crate::acme::renew_at(c)),
                })
            })
            .collect(),
    )
}

/// Which vhost, route, pool and backends a request for `host` and `path` would get.
pub(super) fn explain(
    snap: &Snapshot,
    query: Option<&str>,
    watches: &WatchTable,
) -> Response<Vec<u8>> {
    let params = query_params(query);
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (Some(host), path) = (get("host"), get("path").unwrap_or_else(|| "/".into())) else {
        return json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "give host (and path): /explain?host=example.com&path=/api"}),
        );
    };
    let Some(normalized) = normalize_host(&host) else {
        return json(
            StatusCode::OK,
            &json!({"host": host, "path": path, "answer": 400, "reason": "invalid host"}),
        );
    };
    let vhost_json = |v: usize| {
        let info = &snap.vhosts[v];
        json!({"vhost": info.label, "names": info.names, "source": info.source})
    };
    let body = match snap.routes.lookup(&normalized, &path) {
        Lookup::NoVhost => json!({
            "host": host, "normalized_host": normalized, "path": path,
            "answer": 421, "reason": "no virtual host for this host name",
        }),
        Lookup::NoRoute { vhost } => json!({
            "host": host, "normalized_host": normalized, "path": path,
            "answer": 404, "reason": "no route for this path",
            "vhost": vhost_json(vhost),
        }),
        Lookup::Route { vhost, target, .. } => {
            let record = &snap.records[target];
            let pool = &snap.pools[record.pool];
            json!({
                "host": host, "normalized_host": normalized, "path": path,
                "answer": "proxy",
                "redirect_plain_http_to_https": snap.routes.vhost(vhost).redirect_https && snap.config.has_tls(),
                "vhost": vhost_json(vhost),
                "route": {
                    "path": record.declared.path,
                    "source": record.declared.source,
                    "allowed_by": record.declared.allowed_by,
                },
                "pool": pool_json(pool, watches),
                "plugins": record.plugins
                    .iter()
                    .map(|p| p.spec.name.as_str())
                    .collect::<Vec<_>>(),
            })
        }
    };
    json(StatusCode::OK, &body)
}

pub(super) fn metrics_text(state: &State, snap: &Snapshot, shown: &Shown) -> String {
    let m = &state.lasting.metrics;
    let mut out = String::with_capacity(16 * 1024);
    family(
        &mut out,
        "tollgate_build_info",
        "gauge",
        "Version of the running tollgate.",
    );
    let _ = writeln!(
        out,
        "tollgate_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    single(
        &mut out,
        "tollgate_start_time_seconds",
        "gauge",
        "Start time, seconds since the Unix epoch.",
        state.started_unix,
    );
    single(
        &mut out,
        "tollgate_snapshot_generation",
        "gauge",
        "Generation of the routing snapshot in force.",
        snap.generation,
    );
    family(
        &mut out,
        "tollgate_config_reloads_total",
        "counter",
        "Reload attempts by result.",
    );
    let _ = writeln!(
        out,
        "tollgate_config_reloads_total{{result=\"success\"}} {}",
        m.reloads_ok.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "tollgate_config_reloads_total{{result=\"failure\"}} {}",
        m.reloads_failed.load(Relaxed)
    );
    single(
        &mut out,
        "tollgate_config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the configuration last reloaded successfully (0: never since start).",
        m.last_reload_success_unix.load(Relaxed),
    );
    single(
        &mut out,
        "tollgate_active_requests",
        "gauge",
        "Requests being handled now.",
        shown.active.count(),
    );

    let now = now_ms();
    // `only`: the pools the family is about (a check's state only where there is a check)
    let per_backend_of =
        |out: &mut String,
         name: &str,
         kind: &str,
         help: &str,
         only: &dyn Fn(&crate::upstream::Pool) -> bool,
         value: &dyn Fn(&crate::upstream::Backend) -> u64| {
            family(out, name, kind, help);
            for p in snap.pools.iter().filter(|p| only(p)) {
                for b in &p.backends {
                    let _ = writeln!(
                        out,
                        "{name}{{pool=\"{}\",backend=\"{}\"}} {}",
                        esc(&p.name),
                        b.address,
                        value(b)
                    );
                }
            }
        };
    let per_backend = |out: &mut String,
                       name: &str,
                       kind: &str,
                       help: &str,
                       value: &dyn Fn(&crate::upstream::Backend) -> u64| {
        per_backend_of(out, name, kind, help, &|_| true, value)
    };
    per_backend(
        &mut out,
        "tollgate_backend_up",
        "gauge",
        "1 when the backend may get traffic, 0 while ejected or taken out by its health check.",
        &|b| u64::from(b.state.is_available(now)),
    );
    per_backend_of(
        &mut out,
        "tollgate_backend_check_up",
        "gauge",
        "1 when the backend's active health check lets it serve; only pools with a health_check have it.",
        &|p| p.spec.check.is_some(),
        &|b| u64::from(b.state.check_up()),
    );
    per_backend(
        &mut out,
        "tollgate_backend_inflight_requests",
        "gauge",
        "Requests in flight to the backend.",
        &|b| b.state.inflight.load(Relaxed),
    );
    per_backend(
        &mut out,
        "tollgate_backend_ejections_total",
        "counter",
        "Times the backend was ejected by passive health.",
        &|b| b.state.ejections_total.load(Relaxed),
    );
    family(
        &mut out,
        "tollgate_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the certificate expires, seconds since the Unix epoch.",
    );
    for c in &snap.certs.infos {
        let _ = writeln!(
            out,
            "tollgate_certificate_expiry_timestamp_seconds{{names=\"{}\",source=\"{}\"}} {}",
            esc(&c.names.join(",")),
            esc(&c.source.display().to_string()),
            c.not_after
        );
    }
    family(
        &mut out,
        "tollgate_pool_datacenter",
        "gauge",
        "1 for the datacenter serving each Consul pool that has failover datacenters.",
    );
    for p in snap.pools.iter().filter(|p| !p.spec.failover.is_empty()) {
        let serving = datacenter_json(p);
        let _ = writeln!(
            out,
            "tollgate_pool_datacenter{{pool=\"{}\",datacenter=\"{}\"}} 1",
            esc(&p.name),
            esc(serving["serving"].as_str().unwrap_or_default())
        );
    }
    single(
        &mut out,
        "tollgate_consul_route_conflicts",
        "gauge",
        "Routes Consul services declare that the live configuration does not apply (refused by the claim policy, or taken): /status lists them.",
        snap.route_conflicts.len(),
    );
    family(
        &mut out,
        "tollgate_consul_watch_staleness_seconds",
        "gauge",
        "Seconds since Consul last answered the watch successfully (how stale its pool may be).",
    );
    let now = (crate::clock::unix_secs() as i64) as u64;
    for h in shown.watches.all() {
        if h.last_success_unix > 0 {
            let _ = writeln!(
                out,
                "tollgate_consul_watch_staleness_seconds{{service=\"{}\"}} {}",
                esc(&h.service),
                now.saturating_sub(h.last_success_unix)
            );
        }
    }
    if let Some(st) = shown.failover.get() {
        family(
            &mut out,
            "tollgate_failover_state",
            "gauge",
            "1 for the failover state this node is in.",
        );
        for s in ["INIT", "BACKUP", "MASTER", "FAULT"] {
            let _ = writeln!(
                out,
                "tollgate_failover_state{{state=\"{s}\"}} {}",
                u8::from(st.state == s)
            );
        }
        family(
            &mut out,
            "tollgate_failover_term",
            "gauge",
            "The failover term (every claim increments it).",
        );
        let _ = writeln!(out, "tollgate_failover_term {}", st.term);
        family(
            &mut out,
            "tollgate_failover_rejected_heartbeats_total",
            "counter",
            "Heartbeats rejected (forged, replayed, stale).",
        );
        let _ = writeln!(
            out,
            "tollgate_failover_rejected_heartbeats_total {}",
            st.rejected_packets
        );
        if let Some(ms) = st.peer_last_seen_ms_ago {
            family(
                &mut out,
                "tollgate_failover_peer_last_seen_seconds",
                "gauge",
                "Seconds since the last valid heartbeat from the peer.",
            );
            let _ = writeln!(
                out,
                "tollgate_failover_peer_last_seen_seconds {:.3}",
                ms as f64 / 1000.0
            );
        }
        family(
            &mut out,
            "tollgate_failover_last_transition_timestamp_seconds",
            "gauge",
            "When this node last changed state (Unix time).",
        );
        let _ = writeln!(
            out,
            "tollgate_failover_last_transition_timestamp_seconds {:.3}",
            st.last_transition_unix_ms as f64 / 1000.0
        );
        if let Some(held) = st.consul_lock {
            family(
                &mut out,
                "tollgate_failover_consul_lock_held",
                "gauge",
                "1 while this node holds the failover Consul lock.",
            );
            let _ = writeln!(out, "tollgate_failover_consul_lock_held {}", u8::from(held));
        }
    }
    plugin_metrics(&mut out, snap, state.lasting.plugins);
    m.render_requests(&mut out);
    m.render_ports(&mut out);
    connection_metrics(&mut out, &shown.conns);
    out
}

/// The connection limits' counters.
fn connection_metrics(out: &mut String, conns: &crate::limits::ConnTable) {
    single(
        out,
        "tollgate_connections_open",
        "gauge",
        "Client connections holding a slot now.",
        conns.open(),
    );
    single(
        out,
        "tollgate_connections_accepted_total",
        "counter",
        "Client connections admitted.",
        conns.accepted(),
    );
    family(
        out,
        "tollgate_connections_rejected_total",
        "counter",
        "Client connections closed at once, by the limit that refused them.",
    );
    for r in crate::limits::Refusal::ALL {
        let _ = writeln!(
            out,
            "tollgate_connections_rejected_total{{reason=\"{}\"}} {}",
            r.label(),
            conns.rejected(r)
        );
    }
}
