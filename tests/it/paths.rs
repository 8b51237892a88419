//! Path normalisation against a real tollgate: with route `/` open and route `/admin` to
//! another pool, every other spelling of `/admin` either reaches the `/admin` pool as
//! `/admin` or is refused with 400, over HTTP/1.1, HTTPS, HTTP/2 and absolute-form targets.
//! This is the route layout docs/plugins/auth.md gives to protect a section.

use crate::common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `a.test` with route `/` to `open` and `/admin` to `admin`, `limits` under `[limits]`.
async fn site(open: SocketAddr, admin: SocketAddr, limits: &str) -> Site {
    let cfg = site_config()
        .table("limits", limits)
        .vhost(
            one_vhost()
                .set("redirect_https", "false")
                .route("/", "open")
                .route("/admin", "admin"),
        )
        .pool("open", Pool::backends(&[open]))
        .pool("admin", Pool::backends(&[admin]));
    crate::common::site(cfg, issue_a).await
}

/// One HTTP/1.1 request written as raw bytes (so nothing client-side rewrites the target);
/// returns the status and, for a proxied answer, (upstream name, path the upstream read).
async fn raw<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    target: &str,
) -> (u16, Option<(String, String)>) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{target}: no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let seen = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .map(|v| {
            (
                v["upstream"].as_str().unwrap_or("").to_string(),
                v["path"].as_str().unwrap_or("").to_string(),
            )
        });
    (status, seen)
}

const ADMIN: [&str; 11] = [
    "/%61dmin",
    "//admin",
    "/./admin",
    "/public/../admin",
    "/%2e/admin",
    "/%2e%2e/admin",
    "/public/..;/admin",
    "/admin;x",
    "/%2E%2E/%61%64min/",
    "http://a.test/%61dmin",
    "http://a.test//public/../admin",
];
const REFUSED: [&str; 9] = [
    "/%2fadmin",
    "/admin%2f",
    "/public%2f..%2fadmin",
    "/\\admin",
    "/public/..%5cadmin",
    "/%00admin",
    "/%zzadmin",
    "admin",
    "\\admin",
];

fn admin_path(target: &str) -> &'static str {
    if target.ends_with('/') {
        "/admin/"
    } else if target.ends_with(";x") {
        "/admin;x"
    } else {
        "/admin"
    }
}

#[tokio::test]
async fn other_spellings_of_a_route_reach_it_normalised_or_are_refused() {
    let open = Upstream::start("open").await;
    let admin = Upstream::start("admin").await;
    let s = site(open.addr, admin.addr, "").await;

    for (scheme, tls) in [("http", false), ("https", true)] {
        for t in ADMIN {
            let (status, seen) = if tls {
                raw(
                    tls_connect(&s.ca, s.https, "a.test", &["http/1.1"]).await,
                    t,
                )
                .await
            } else {
                raw(tokio::net::TcpStream::connect(s.http).await.unwrap(), t).await
            };
            assert_eq!(status, 200, "{scheme} {t}");
            assert_eq!(
                seen,
                Some(("admin".to_string(), admin_path(t).to_string())),
                "{scheme} {t}: routed to the /admin pool and forwarded normalised"
            );
        }
        for t in REFUSED {
            let (status, _) = if tls {
                raw(
                    tls_connect(&s.ca, s.https, "a.test", &["http/1.1"]).await,
                    t,
                )
                .await
            } else {
                raw(tokio::net::TcpStream::connect(s.http).await.unwrap(), t).await
            };
            assert_eq!(status, 400, "{scheme} {t}");
        }
    }
    // the open route still works, and case stays significant
    let (status, seen) = raw(
        tokio::net::TcpStream::connect(s.http).await.unwrap(),
        "/Admin",
    )
    .await;
    assert_eq!(
        (status, seen),
        (200, Some(("open".into(), "/Admin".into())))
    );
    assert_eq!(open.hits(), 1, "only /Admin reached the open pool");

    // HTTP/2: the same spellings in :path
    let tls = tls_connect(&s.ca, s.https, "a.test", &["h2"]).await;
    let (mut h2c, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let h2_get = |h2c: &mut h2::client::SendRequest<bytes::Bytes>, path: &str| {
        let req = http::Request::builder()
            .uri(format!("https://a.test{path}"))
            .body(())
            .unwrap();
        h2c.send_request(req, true).unwrap().0
    };
    for t in ADMIN.iter().filter(|t| t.starts_with('/')) {
        let resp = h2_get(&mut h2c, t).await.unwrap();
        assert_eq!(resp.status(), 200, "h2 {t}");
        let mut body = resp.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (v["upstream"].as_str(), v["path"].as_str()),
            (Some("admin"), Some(admin_path(t))),
            "h2 {t}"
        );
    }
    for t in ["/%2fadmin", "/public/..%5cadmin", "/%00admin"] {
        let resp = h2_get(&mut h2c, t).await.unwrap();
        assert_eq!(resp.status(), 400, "h2 {t}");
    }
    assert_eq!(
        open.hits(),
        1,
        "no spelling of /admin reached the open pool"
    );

    // every refusal is in the access log with its reason
    let log = s.tg.log_text();
    for reason in [
        "encoded / or",
        "backslash in the path",
        "control character or NUL in the path",
        "malformed percent-encoding in the path",
        "request target is not origin-form",
    ] {
        assert!(log.contains(reason), "{reason} not logged:\n{log}");
    }
}

#[tokio::test]
async fn encoded_slashes_can_be_kept_as_data() {
    let open = Upstream::start("open").await;
    let admin = Upstream::start("admin").await;
    let s = site(open.addr, admin.addr, "encoded_slashes = \"keep\"").await;
    let conn = || tokio::net::TcpStream::connect(s.http);
    assert_eq!(
        raw(conn().await.unwrap(), "/public%2f..%2fadmin").await,
        (200, Some(("open".into(), "/public%2F..%2Fadmin".into()))),
        "one segment, not a way into /admin"
    );
    assert_eq!(raw(conn().await.unwrap(), "/\\admin").await.0, 400);
    assert_eq!(raw(conn().await.unwrap(), "/%00").await.0, 400);
    assert_eq!(
        raw(conn().await.unwrap(), "/%61dmin").await,
        (200, Some(("admin".into(), "/admin".into())))
    );
    assert_eq!(admin.hits(), 1);
}
