//! Consul answers a real agent rarely gives, from a scripted HTTP server: errors, an index
//! going backwards or missing, 403, 429, a reset connection. The pool changes only on a
//! successful answer, and the index rules are checked on the wire.

use crate::common::*;
use serde_json::Value;
use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
enum Step {
    Answer {
        status: u16,
        index: Option<u64>,
        body: String,
    },
    /// A 200 from servers that have lost their leader (`X-Consul-KnownLeader: false`).
    NoLeader {
        index: u64,
        body: String,
    },
    /// Answer only after this long (past the client's timeout).
    Slow(Duration),
    Reset,
}

/// Answers each request with the next step; with no step left it holds the request for a
/// while (as a blocking query would) and answers with the last successful answer.
struct Scripted {
    addr: SocketAddr,
    script: Arc<Mutex<VecDeque<Step>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start() -> Scripted {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let script: Arc<Mutex<VecDeque<Step>>> = Arc::default();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s2, seen2) = (script.clone(), seen.clone());
        tokio::spawn(async move {
            let last_ok: Arc<Mutex<Option<Step>>> = Arc::default();
            loop {
                let Ok((mut sock, _)) = l.accept().await else {
                    continue;
                };
                let (script, seen, last_ok) = (s2.clone(), seen2.clone(), last_ok.clone());
                tokio::spawn(async move {
                    loop {
                        let mut buf = vec![0u8; 8192];
                        let mut n = 0;
                        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            match sock.read(&mut buf[n..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => n += k,
                            }
                        }
                        let req = String::from_utf8_lossy(&buf[..n]).to_string();
                        seen.lock().unwrap().push(req);
                        let step = script.lock().unwrap().pop_front();
                        let step = match step {
                            Some(s) => s,
                            None => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                match last_ok.lock().unwrap().clone() {
                                    Some(s) => s,
                                    None => Step::Answer {
                                        status: 200,
                                        index: Some(1),
                                        body: "[]".into(),
                                    },
                                }
                            }
                        };
                        let step = match step {
                            Step::Slow(d) => {
                                tokio::time::sleep(d).await;
                                Step::Answer {
                                    status: 200,
                                    index: Some(999),
                                    body: "[]".into(),
                                }
                            }
                            other => other,
                        };
                        match step {
                            Step::Slow(_) => unreachable!(),
                            Step::NoLeader { index, body } => {
                                let resp = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: {index}\r\n\
                                     X-Consul-KnownLeader: false\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if sock.write_all(resp.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Step::Reset => {
                                // linger 0: the close is a TCP reset (it cannot block: no data waits)
                                #[allow(deprecated)]
                                let _ = sock.set_linger(Some(Duration::ZERO));
                                return;
                            }
                            Step::Answer {
                                status,
                                index,
                                body,
                            } => {
                                if status == 200 {
                                    *last_ok.lock().unwrap() = Some(Step::Answer {
                                        status,
                                        index,
                                        body: body.clone(),
                                    });
                                }
                                let idx = index
                                    .map(|i| format!("X-Consul-Index: {i}\r\n"))
                                    .unwrap_or_default();
                                let resp = format!(
                                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{idx}Content-Length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if sock.write_all(resp.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Scripted { addr, script, seen }
    }

    fn push(&self, s: Step) {
        self.script.lock().unwrap().push_back(s);
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The index asked for by the query that follows the one answered when `before`
    /// requests had been seen (waits up to 10 s for it to arrive).
    async fn next_index(&self, before: usize) -> Option<u64> {
        wait_for("the next query", Duration::from_secs(10), || async {
            self.requests().len() >= before + 2
        })
        .await;
        index_of(&self.requests()[before + 1])
    }
}

fn ok(index: Option<u64>, backends: &[SocketAddr]) -> Step {
    let entries: Vec<Value> = backends
        .iter()
        .map(|a| serde_json::json!({"Node": {"Address": "127.0.0.1"}, "Service": {"Address": a.ip().to_string(), "Port": a.port()}}))
        .collect();
    Step::Answer {
        status: 200,
        index,
        body: Value::Array(entries).to_string(),
    }
}

fn err(status: u16, body: &str) -> Step {
    Step::Answer {
        status,
        index: None,
        body: body.into(),
    }
}

fn index_of(req: &str) -> Option<u64> {
    let line = req.lines().next()?;
    let q = line.split_once('?')?.1.split(' ').next()?;
    q.split('&')
        .find_map(|p| p.strip_prefix("index="))
        .and_then(|v| v.parse().ok())
}

async fn serving(http: SocketAddr) -> BTreeSet<String> {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut set = BTreeSet::new();
    for _ in 0..6 {
        if let Ok(r) = c
            .get(format!("http://{http}/"))
            .header("host", "a.test")
            .send()
            .await
        {
            if let Ok(j) = r.json::<Value>().await {
                set.insert(j["upstream"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    set
}

async fn wait_serving(http: SocketAddr, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(
        &format!("routing to exactly {want:?}"),
        Duration::from_secs(15),
        || {
            let want = want.clone();
            async move { serving(http).await == want }
        },
    )
    .await;
}

#[tokio::test]
async fn only_successful_answers_change_pools_and_index_rules_hold_on_the_wire() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let consul = Scripted::start().await;
    consul.push(ok(Some(10), &[a.addr]));

    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::new()
        .consul_at(
            &format!("http://{}", consul.addr),
            "token = \"secret-acl-token\"\nwait = \"2s\"",
        )
        .http()
        .vhost(Vhost::new(&["a.test"]).route("/", "api"))
        .pool("api", Pool::consul("api", &[]));
    let (http, admin) = (cfg.http_addr(), cfg.admin_port());
    let mut tg = cfg.start(dir.path()).await;
    wait_serving(http, &["a"]).await;
    let first = consul.requests()[0].clone();
    assert!(
        first.starts_with("GET /v1/health/service/api?index=1&wait=2s&passing=1&cached "),
        "{first}"
    );
    assert!(
        first
            .to_ascii_lowercase()
            .contains("x-consul-token: secret-acl-token"),
        "{first}"
    );

    // Each fault: the pool keeps serving a, and the watch starts over from index 1.
    for (what, step) in [
        ("500", err(500, "rpc error")),
        ("429", err(429, "too many requests")),
        ("reset", Step::Reset),
        (
            "not json",
            Step::Answer {
                status: 200,
                index: Some(11),
                body: "<html>".into(),
            },
        ),
    ] {
        let before = consul.requests().len();
        consul.push(step);
        wait_for(
            &format!("the {what} to be answered and retried"),
            Duration::from_secs(20),
            || async { consul.requests().len() >= before + 2 },
        )
        .await;
        assert_eq!(
            serving(http).await,
            BTreeSet::from(["a".to_string()]),
            "after {what}"
        );
        let reqs = consul.requests();
        assert_eq!(
            index_of(&reqs[before + 1]),
            Some(1),
            "after {what}: resync from index 1"
        );
    }

    // A change, then an index that goes backwards: reset to 1, nothing stale.
    consul.push(ok(Some(12), &[a.addr, b.addr]));
    wait_serving(http, &["a", "b"]).await;
    let before = consul.requests().len();
    consul.push(ok(Some(5), &[b.addr]));
    wait_serving(http, &["b"]).await;
    assert_eq!(
        consul.next_index(before).await,
        Some(1),
        "backwards index resets"
    );

    // No X-Consul-Index at all: cannot block on it, start over from 1.
    let before = consul.requests().len();
    consul.push(ok(None, &[a.addr]));
    wait_serving(http, &["a"]).await;
    assert_eq!(consul.next_index(before).await, Some(1));

    // A forbidden token is a clear error, not an empty pool.
    consul.push(err(403, "ACL not found"));
    wait_for("the 403 to be logged", Duration::from_secs(10), || async {
        tg.log_text()
            .contains("403 Forbidden: the Consul token cannot read service `api` (ACL not found)")
    })
    .await;
    assert_eq!(serving(http).await, BTreeSet::from(["a".to_string()]));

    // Index 0 is sent on as 1.
    let before = consul.requests().len();
    consul.push(ok(Some(0), &[a.addr, b.addr]));
    wait_serving(http, &["a", "b"]).await;
    assert_eq!(
        consul.next_index(before).await,
        Some(1),
        "index 0 is never sent"
    );

    // The same index with the same body changes nothing: no rebuild. (The generation moves
    // with the Snapshot itself, so it cannot race the way a log line would.)
    let generation = || async move {
        let v: Value = reqwest::get(format!("http://127.0.0.1:{admin}/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["snapshot"]["generation"].as_u64().unwrap()
    };
    let n = generation().await;
    let before = consul.requests().len();
    consul.push(ok(Some(40), &[a.addr, b.addr]));
    consul.push(ok(Some(40), &[a.addr, b.addr]));
    wait_for(
        "both answers to be taken",
        Duration::from_secs(10),
        || async { consul.requests().len() >= before + 3 },
    )
    .await;
    assert_eq!(
        generation().await,
        n,
        "identical answers rebuilt the Snapshot"
    );

    // No known leader: the answer (which would empty the pool) is not acted on.
    consul.push(Step::NoLeader {
        index: 41,
        body: Value::Array(vec![]).to_string(),
    });
    wait_for(
        "the leaderless answer to be refused",
        Duration::from_secs(10),
        || async {
            tg.log_text()
                .contains("no leader (X-Consul-KnownLeader: false)")
        },
    )
    .await;
    assert_eq!(
        serving(http).await,
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );

    // An answer slower than wait + wait/16 + margin (7.1 s here): the client gives up, the pool stays.
    let failed = || tg.log_text().matches("Consul watch failed").count();
    let f0 = failed();
    consul.push(Step::Slow(Duration::from_secs(9)));
    wait_for(
        "the slow answer to time out",
        Duration::from_secs(20),
        || async { failed() > f0 },
    )
    .await;
    assert!(
        tg.log_text()
            .contains("Consul did not answer within 7.125s (wait + wait/16 + 5s): timed out"),
        "{}",
        tg.log_text()
    );
    assert_eq!(
        serving(http).await,
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    tg.child.kill().ok();
}
