//! JSON views of the live state, `/explain`, and the `/metrics` text.

use super::Shown;
use super::{json, query_params};
use crate::clock::now_ms;
use crate::config::Balance;
use crate::discovery::consul::WatchTable;
use crate::metrics::{family, single, Metrics};
use crate::routing::{normalize_host, Lookup};
use crate::state::{Snapshot, State};
use crate::upstream::Pool;
use http::{Response, StatusCode};
use serde_json::{json, Value};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// Whose keys seal the session tickets, in words an operator can act on.
fn tls_status(t: &super::TlsAtStart) -> Value {
    let (keys, note) = match (t.session_tickets, t.ticket_key_files) {
        (false, _) => ("off", "no session tickets: each listener remembers its last 256 sessions"),
        (true, _) if t.fleet.is_some() => ("consul", "ticket keys from Consul KV (tls.session_ticket_consul), rotated by one instance of the fleet: every instance following them resumes the others' sessions"),
        (true, 0) => (
            "process",
            "ticket keys are this process's own: a restart, a binary upgrade or another instance cannot resume its sessions (tls.session_ticket_keys shares keys)",
        ),
        (true, _) => ("files", "ticket keys from tls.session_ticket_keys: instances sharing the files resume each other's sessions"),
    };
    json!({
        "session_tickets": keys,
        "ticket_key_files": t.ticket_key_files,
        "note": note,
        "post_quantum": t.post_quantum,
        "consul": t.fleet.as_ref().map(|f| f.status()),
        "read_at_start": true,
    })
}

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
        "tls": tls_status(&shown.tls),
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
    let serving = pool.serving_datacenter();
    match &pool.spec.serving {
        Some((_, why)) => {
            json!({ "serving": serving, "own": own, "failover": pool.spec.failover, "reason": why })
        }
        None => json!({ "serving": serving, "own": own, "failover": pool.spec.failover }),
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
    // the request as matchers see it: `method=POST`, `header=x-canary:1` (repeatable), and
    // the query in `path`
    let method = get("method")
        .and_then(|m| http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
        .unwrap_or(http::Method::GET);
    let mut headers = http::HeaderMap::new();
    for (k, v) in &params {
        let Some((name, value)) = (k == "header").then(|| v.split_once(':')).flatten() else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }
    let view = crate::routing::RequestView {
        method: &method,
        headers: &headers,
        query: path.split_once('?').map(|(_, q)| q),
    };
    // routes passed over for their matchers before the one chosen (or all, with none)
    let skipped = |vhost: usize, upto: usize| -> Vec<Value> {
        let bare = path.split(['?', '#']).next().unwrap_or("");
        let bare = crate::routing::path::strip_params(bare);
        snap.routes.vhost(vhost).routes()[..upto]
            .iter()
            .filter(|e| crate::routing::prefix_matches(&e.prefix, &bare))
            .filter_map(|e| {
                let why = e.matchers.as_ref()?.fails(&view)?;
                Some(json!({
                    "path": e.prefix,
                    "source": snap.records[e.target].declared.source,
                    "passed_over": why,
                }))
            })
            .collect()
    };
    let body = match snap.routes.lookup_request(&normalized, &path, Some(&view)) {
        Lookup::NoVhost => json!({
            "host": host, "normalized_host": normalized, "path": path,
            "answer": 421, "reason": "no virtual host for this host name",
        }),
        Lookup::NoRoute { vhost } => json!({
            "host": host, "normalized_host": normalized, "path": path,
            "answer": 404, "reason": "no route for this path",
            "vhost": vhost_json(vhost),
            "passed_over": skipped(vhost, snap.routes.vhost(vhost).routes().len()),
        }),
        Lookup::Route {
            vhost,
            target,
            route,
        } => {
            let record = &snap.records[target];
            let pool = record.pool.and_then(|i| snap.pools.get(i));
            let d = &record.declared;
            let answer = match (&d.respond, &d.options.redirect) {
                (Some(page), _) => json!({"respond": page.status}),
                (None, Some((status, to))) => json!({"redirect": status, "to": to}),
                (None, None) => json!("proxy"),
            };
            json!({
                "host": host, "normalized_host": normalized, "path": path,
                "answer": answer,
                "redirect_plain_http_to_https": snap.routes.vhost(vhost).redirect_https && snap.config.has_tls(),
                "vhost": vhost_json(vhost),
                "route": {
                    "path": record.declared.path,
                    "source": record.declared.source,
                    "allowed_by": record.declared.allowed_by,
                    "matched_by": snap.routes.vhost(vhost).routes()[route]
                        .matchers
                        .as_ref()
                        .map(|m| m.describe())
                        .unwrap_or_default(),
                },
                "passed_over": skipped(vhost, route),
                "pool": pool.map(|p| pool_json(p, watches)),
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
    m.render_reloads(&mut out);
    shown.active.render_metrics(&mut out);

    crate::upstream::render_metrics(&mut out, &snap.pools, now_ms());
    snap.certs.render_metrics(&mut out);
    if let Some(f) = &shown.tls.fleet {
        f.render_metrics(&mut out);
    }
    single(
        &mut out,
        "tollgate_consul_route_conflicts",
        "gauge",
        "Routes Consul services declare that the live configuration does not apply (refused by the claim policy, or taken): /status lists them.",
        snap.route_conflicts.len(),
    );
    shown.watches.render_metrics(&mut out);
    if let Some(st) = shown.failover.get() {
        st.render_metrics(&mut out);
    }
    state
        .lasting
        .plugins
        .render_metrics(&mut out, &snap.plugins);
    m.render_requests(&mut out);
    m.render_ports(&mut out);
    m.render_handshakes(&mut out);
    shown.conns.render_metrics(&mut out);
    out
}
