//! One plugin round trip on the request path, without the network: create the HTTP
//! context, `proxy_on_request_headers`, then `on_done` / `on_log` / `on_delete` — what
//! every request pays per plugin. Three plugins: a no-op written in WAT (the host's own
//! cost), ratelimit, and auth with an HS256 JWT (both built by plugins/build).
//!
//!     plugins/build && cargo bench --bench wasm_call

use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tollgate::config::{OnError, Origin, PluginSpec};
use tollgate::wasm::{Chain, RequestInfo, Verdict};

const HS_SECRET: &str = "bench secret for hs256, at least 32 bytes long";

fn spec(name: &str, file: PathBuf, config: &str) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        file,
        config: config.as_bytes().to_vec(),
        vm_config: Vec::new(),
        vm_id: name.into(),
        root_id: String::new(),
        on_error: OnError::FailClosed,
        cpu_deadline: Duration::from_millis(50),
        max_memory: 64 << 20,
        origin: Origin {
            file: Arc::from("bench"),
            line: 0,
        },
    }
}

fn b64url(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn hs256_token() -> String {
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64url(br#"{"sub":"bench","exp":4102444800}"#);
    let signed = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HS_SECRET.as_bytes());
    let sig = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", b64url(sig.as_ref()))
}

/// Drive a future that never waits (no callouts here).
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a plugin waited"),
    }
}

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // the no-op plugin (the host's own cost), shared with benches/plugins.py
    let noop = root.join("benches/noop.wat");
    let dist = root.join("plugins/dist");
    let mut specs = BTreeMap::new();
    specs.insert("noop".to_string(), spec("noop", noop, ""));
    specs.insert(
        "ratelimit".to_string(),
        spec(
            "ratelimit",
            dist.join("ratelimit.wasm"),
            r#"{"rate": 1e9, "burst": 1000000000}"#,
        ),
    );
    specs.insert(
        "jwt".to_string(),
        spec(
            "jwt",
            dist.join("auth.wasm"),
            &format!(r#"{{"jwt": {{"hs256_secret": "{HS_SECRET}", "claims_to_headers": {{"sub": "x-user"}}}}}}"#),
        ),
    );
    let plugins = tollgate::wasm::Host::new()
        .load(&specs, 1)
        .unwrap_or_else(|e| panic!("{e} (run plugins/build first)"));
    let token = hs256_token();
    let mut req = pingora::http::RequestHeader::build("GET", b"/api/items?page=2", None).unwrap();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("x-request-id", "0123456789abcdef"),
    ] {
        req.insert_header(k, v).unwrap();
    }
    req.insert_header("authorization", format!("Bearer {token}"))
        .unwrap();
    let info = RequestInfo {
        source: Some("192.0.2.7:51234".parse().unwrap()),
        request_id: "0123456789abcdef".into(),
        protocol: "HTTP/1.1",
        ..Default::default()
    };
    let pools: tollgate::wasm::CalloutPools = Arc::new(Vec::new());
    let mut g = c.benchmark_group("on_request_headers round trip");
    for chain in [
        vec!["noop"],
        vec!["ratelimit"],
        vec!["jwt"],
        vec!["ratelimit", "jwt"],
    ] {
        let list: Arc<[_]> = chain.iter().map(|n| plugins[*n].clone()).collect();
        g.bench_function(chain.join("+"), |b| {
            b.iter(|| {
                // as the proxy does: a (recycled) chain, the request lent to it
                let mut ch = Chain::lent(&list, &pools);
                ch.data_mut().info.clone_from(&info);
                let v = ready(ch.request_headers(&mut req, true));
                assert!(matches!(v, Verdict::Continue), "{v:?}");
                ch.finish(Some(&mut req));
                ch.recycle();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
