//! The read-only HTML dashboard: the same data as the JSON API, rendered on the server with
//! inline CSS and no scripts or external assets (it must work on an air-gapped admin host).

use crate::clock::now_ms;
use crate::state::{Snapshot, State};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f7f8fa}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}\
.meta{color:#5b6475;margin-bottom:8px}table{border-collapse:collapse;background:#fff;min-width:640px}\
th,td{border:1px solid #d5d9e0;padding:6px 10px;text-align:left}th{background:#e9edf3}\
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}code{font-size:13px}";

pub(super) fn login_page() -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>tollgate admin</title><style>{STYLE}</style></head>\
         <body><h1>tollgate admin</h1><p>This dashboard needs the admin token.</p>\
         <form method=get action=/><input type=password name=token placeholder=token autofocus> \
         <button>Open</button></form></body></html>"
    )
}

pub(super) fn page(state: &State, snap: &Snapshot, active_requests: usize) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=10>\
         <title>tollgate</title><style>{STYLE}</style></head><body>\
         <h1>tollgate {}</h1><div class=meta>up {}s · snapshot generation {} · config <code>{}</code> · {} requests in flight</div>",
        env!("CARGO_PKG_VERSION"),
        state.started.elapsed().as_secs(),
        snap.generation,
        esc(&snap.config.source.display().to_string()),
        active_requests,
    );
    if let Some(r) = state.last_reload() {
        let _ = write!(
            h,
            "<div class=meta>last reload: <span class={}>{}</span>{}</div>",
            if r.ok { "ok" } else { "bad" },
            if r.ok { "applied" } else { "rejected" },
            esc(&r.errors.join("; "))
        );
    }

    h.push_str("<h2>Routes</h2><table id=routes><tr><th>vhost</th><th>names</th><th>path</th><th>pool</th><th>source</th></tr>");
    for (vi, v) in snap.vhosts.iter().enumerate() {
        let names = if v.default && v.names.is_empty() {
            "(default)".to_string()
        } else {
            v.names.join(", ") + if v.default { " (default)" } else { "" }
        };
        for r in snap.routes_of(vi) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                esc(&v.label),
                esc(&names),
                esc(&r.path),
                esc(&r.pool),
                esc(r.source.strip_prefix("file ").unwrap_or(&r.source))
            );
        }
    }
    h.push_str("</table>");

    h.push_str("<h2>Pools</h2><table id=pools><tr><th>pool</th><th>backend</th><th>weight</th><th>state</th><th>in flight</th><th>ejections</th></tr>");
    let now = now_ms();
    for p in &snap.pools {
        for b in &p.backends {
            let up = b.state.is_available(now);
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td class={}>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&p.name),
                b.address,
                b.weight,
                if up { "ok" } else { "bad" },
                if up { "up" } else { "ejected" },
                b.state.inflight.load(Relaxed),
                b.state.ejections_total.load(Relaxed)
            );
        }
    }
    h.push_str("</table>");

    if !snap.ports.is_empty() {
        h.push_str("<h2>Service ports</h2><table id=ports><tr><th>port</th><th>address</th><th>protocol</th><th>pool</th><th>open</th><th>total</th><th>source</th></tr>");
        for p in &snap.ports {
            let pools: Vec<String> = p
                .spec
                .sni
                .iter()
                .map(|r| format!("{} → {}", r.names.join(", "), r.pool))
                .chain(p.spec.pool.iter().cloned())
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&p.spec.name),
                p.spec.address,
                p.spec.protocol.name(),
                esc(&pools.join("; ")),
                p.metrics.open.load(Relaxed),
                p.metrics.total.load(Relaxed),
                esc(p.spec.source.strip_prefix("file ").unwrap_or(&p.spec.source))
            );
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Certificates</h2><table id=certs><tr><th>names</th><th>expires in</th><th>file</th></tr>");
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for c in &snap.certs.infos {
        let days = (c.not_after - now_unix).div_euclid(86_400);
        let _ = write!(
            h,
            "<tr><td>{}</td><td class={}>{} days</td><td><code>{}</code></td></tr>",
            esc(&c.names.join(", ")),
            if days < 14 { "bad" } else { "ok" },
            days,
            esc(&c.source.display().to_string())
        );
    }
    h.push_str("</table>");

    let handshakes = state.lasting.metrics.handshake_counts();
    if !handshakes.is_empty() {
        h.push_str("<h2>TLS handshakes</h2><table id=tls><tr><th>listener</th><th>full</th><th>resumed</th><th>resumption rate</th></tr>");
        for (listener, full, resumed) in handshakes {
            let rate = match full + resumed {
                0 => "–".to_string(),
                all => format!("{:.1}%", 100.0 * resumed as f64 / all as f64),
            };
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{full}</td><td>{resumed}</td><td>{rate}</td></tr>",
                esc(&listener)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    h
}
