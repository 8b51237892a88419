//! TCP service ports (and `tls`, `sni`): admission, the backend chosen and connected (a
//! failed connect moves to another backend, bounded by the pool's `retries`; passive
//! ejection as for HTTP), an optional PROXY header, then bytes copied both ways with
//! backpressure, half-close and an idle timeout.

use super::hello::{server_name, Hello, MAX_HELLO};
use super::{find, Key, Shared};
use crate::clock::now_ms;
use crate::config::{PortProtocol, SendProxy};
use crate::limits::proxy_protocol;
use crate::metrics::PortMetrics;
use crate::upstream::{InflightGuard, Pool};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(super) async fn accept_loop(shared: Shared, k: Key, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // out of descriptors and the like: wait instead of spinning
                tracing::warn!(address = %k.0, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move { connection(shared, k, stream, peer).await });
    }
}

async fn connection(shared: Shared, k: Key, mut client: TcpStream, peer: SocketAddr) {
    let _counted = shared.active.enter();
    let snap = shared.live.load_full();
    let Some(port) = find(&snap, k) else {
        return;
    };
    let limits = &snap.config.limits;
    let m = &port.metrics;
    let _ = client.set_nodelay(true);
    let local = client.local_addr().unwrap_or(k.0);
    // the client: the socket's peer, or what a trusted balancer's PROXY header says
    let mut source = peer;
    if port.spec.proxy_protocol {
        if !crate::config::cidr::any_contains(&limits.trusted_proxies, peer.ip()) {
            shared.conns.count(crate::limits::Refusal::UntrustedProxy);
            m.refused.fetch_add(1, Relaxed);
            return;
        }
        match read_proxy_header(&mut client, limits.header_timeout).await {
            Ok(Some(src)) => source = src,
            Ok(None) => {}
            Err(e) => {
                shared.conns.count(crate::limits::Refusal::BadProxyHeader);
                m.refused.fetch_add(1, Relaxed);
                tracing::debug!(peer = %peer, error = %e, "bad PROXY protocol header on a service port");
                return;
            }
        }
    }
    let slot = match shared.conns.admit(source.ip(), limits, Instant::now()) {
        Ok(g) => g,
        Err(_) => {
            m.refused.fetch_add(1, Relaxed);
            return;
        }
    };
    // the client's descriptor and the backend's
    let Some(fds) = shared.fds.take(2, &port.spec.name) else {
        m.refused.fetch_add(1, Relaxed);
        return;
    };
    m.total.fetch_add(1, Relaxed);
    m.open.fetch_add(1, Relaxed);
    // the slot goes back before the gauge drops: a reader who sees no connection open may
    // take the slot again at once
    let _held = (slot, fds, Decrement(&m.open));
    match port.spec.protocol {
        PortProtocol::Tls => {
            let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(client))
                .await
            {
                Ok(Ok(t)) => t,
                _ => {
                    m.refused.fetch_add(1, Relaxed);
                    return;
                }
            };
            let Some(pool) = port.pool.map(|i| snap.pools[i].clone()) else {
                return;
            };
            forward(tls, &pool, port, port.spec.send_proxy, source, local).await;
        }
        PortProtocol::Sni => {
            let name = match peek_hello(&client, limits.handshake_timeout).await {
                Ok(name) => name,
                Err(e) => {
                    m.refused.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %source, error = e, "no usable ClientHello on a passthrough port");
                    return;
                }
            };
            let Some((i, send_proxy)) = port.pool_for_sni(name.as_deref()) else {
                m.refused.fetch_add(1, Relaxed);
                tracing::debug!(peer = %source, sni = ?name, port = %port.spec.name, "no route for this server name");
                return;
            };
            let pool = snap.pools[i].clone();
            forward(client, &pool, port, send_proxy, source, local).await;
        }
        _ => {
            let Some(pool) = port.pool.map(|i| snap.pools[i].clone()) else {
                return;
            };
            forward(client, &pool, port, port.spec.send_proxy, source, local).await;
        }
    }
}

struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Read a PROXY header off the start of a plain socket (nothing past it is consumed: the
/// header is peeked, then exactly its length read). Headers up to the size the listeners
/// take (`proxy_protocol::MAX_HEADER`).
async fn read_proxy_header(
    s: &mut TcpStream,
    deadline: Duration,
) -> Result<Option<SocketAddr>, String> {
    let work = async {
        let judge = |b: &[u8]| match proxy_protocol::parse(b) {
            Err(e) => Some(Err(e)),
            Ok(proxy_protocol::Parsed::Incomplete) => None,
            Ok(proxy_protocol::Parsed::Done { len, source }) => Some(Ok((len, source))),
        };
        let (len, source) = peek_for(s, proxy_protocol::MAX_HEADER, judge)
            .await
            .map_err(|e| match e {
                Peek::TooLong => "PROXY header too long".to_string(),
                Peek::Closed => "connection closed inside the PROXY header".to_string(),
                Peek::Failed(e) => e,
            })?;
        let mut skip = vec![0u8; len];
        s.read_exact(&mut skip)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(source)
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| format!("no whole PROXY header within {deadline:?}"))?
}

/// The server name of the client's ClientHello, peeked (the bytes stay for the backend).
async fn peek_hello(s: &TcpStream, deadline: Duration) -> Result<Option<String>, String> {
    let work = peek_for(s, MAX_HELLO + 5, |b| match server_name(b) {
        Hello::Name(name) => Some(Ok(name)),
        Hello::Invalid(why) => Some(Err(why.to_string())),
        Hello::Incomplete => None,
    });
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(Peek::TooLong)) => Err("a ClientHello over 16 KiB".into()),
        Ok(Err(Peek::Closed)) => Err("connection closed before a whole ClientHello".into()),
        Ok(Err(Peek::Failed(e))) => Err(e),
        Err(_) => Err("no whole ClientHello within limits.handshake_timeout".into()),
    }
}

/// Why [`peek_for`] ended without an answer.
#[derive(Debug)]
enum Peek {
    /// `max` bytes were there and the judge still wanted more.
    TooLong,
    /// The peer closed (or reset) before the judge had enough.
    Closed,
    /// What the judge refused, or a read error.
    Failed(String),
}

/// Peek at the start of `s` until `judge` decides on the bytes there (`Some`). Between looks
/// it waits for new bytes to arrive (readiness, not a timer: a connection that sent half a
/// header costs nothing until it sends more), and it ends as soon as the peer closes or
/// resets. Nothing is consumed.
async fn peek_for<T>(
    s: &TcpStream,
    max: usize,
    mut judge: impl FnMut(&[u8]) -> Option<Result<T, String>>,
) -> Result<T, Peek> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let mut buf = vec![0u8; max];
    let mut seen = 0;
    loop {
        let ready = s
            .ready(Interest::READABLE)
            .await
            .map_err(|e| Peek::Failed(format!("read: {e}")))?;
        let closed = ready.is_read_closed();
        let peeked = s.try_io(Interest::READABLE, || {
            // SAFETY: `buf` is valid for `buf.len()` writable bytes, and the descriptor is the
            // stream's own, open while `s` is borrowed
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            if n == seen && n > 0 && !closed {
                // nothing new since the last look: clear the readiness and wait for more
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match peeked {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(Peek::Closed),
            Err(e) => return Err(Peek::Failed(format!("read: {e}"))),
        };
        if n == 0 {
            return Err(Peek::Closed);
        }
        if let Some(r) = judge(&buf[..n]) {
            return r.map_err(Peek::Failed);
        }
        if n == max {
            return Err(Peek::TooLong);
        }
        if closed {
            return Err(Peek::Closed);
        }
        seen = n;
    }
}

/// Connect to a backend of `pool` (another on failure, up to `retries` more), send the PROXY
/// header the port asks for, then copy until both sides are done or the port's idle
/// timeout passes.
async fn forward<C>(
    client: C,
    pool: &Arc<Pool>,
    port: &crate::state::Port,
    send_proxy: SendProxy,
    source: SocketAddr,
    local: SocketAddr,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let m = &port.metrics;
    let timeout = port
        .spec
        .connect_timeout
        .unwrap_or(pool.spec.connect_timeout);
    let mut tried = Vec::new();
    let (mut upstream, i) = loop {
        let now = now_ms();
        let Some(i) = pool.select(now, &tried) else {
            m.refused.fetch_add(1, Relaxed);
            tracing::debug!(port = %port.spec.name, pool = %pool.name, "no live backend for a service-port connection");
            return;
        };
        tried.push(i);
        let b = &pool.backends[i];
        match tokio::time::timeout(timeout, TcpStream::connect(b.address)).await {
            Ok(Ok(s)) => break (s, i),
            failure => {
                m.connect_failures.fetch_add(1, Relaxed);
                pool.metrics.connect_failures.fetch_add(1, Relaxed);
                let error = match failure {
                    Ok(Err(e)) if crate::upstream::local_shortage(&e) => {
                        // tollgate's own shortage (descriptors, ports, memory): not the
                        // backend's fault, and another backend would fare no better
                        tracing::warn!(port = %port.spec.name, backend = %b.address, error = %e, "cannot open a connection to a backend here");
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("timed out after {timeout:?}"),
                };
                if let Some(ms) = b.state.record_failure(now_ms(), &pool.spec.health) {
                    tracing::warn!(pool = %pool.name, backend = %b.address, eject_ms = ms, error = %error, "backend ejected after consecutive failures");
                }
                if tried.len() > pool.spec.retries as usize || !pool.has_available(now_ms(), &tried)
                {
                    tracing::debug!(port = %port.spec.name, pool = %pool.name, error = %error, "no backend could be reached");
                    return;
                }
            }
        }
    };
    let b = &pool.backends[i];
    b.state.record_success();
    let _inflight = InflightGuard::new(b.state.clone());
    let _ = upstream.set_nodelay(true);
    let header = match send_proxy {
        SendProxy::None => None,
        SendProxy::V1 => Some(proxy_protocol::v1_header(source, local)),
        SendProxy::V2 => Some(proxy_protocol::v2_header(source, local)),
    };
    if let Some(h) = header {
        if upstream.write_all(&h).await.is_err() {
            return;
        }
    }
    splice(client, upstream, port.spec.idle_timeout, m).await;
}

/// Copy both ways until both directions are done (each side's EOF is passed on as a
/// shutdown of the other's write half) or nothing moved for `idle`. Buffers are fixed, so a
/// slow reader holds the writer back (backpressure) instead of growing memory.
pub(super) async fn splice<A, B>(a: A, b: B, idle: Duration, m: &PortMetrics)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = AtomicU64::new(now_ms());
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = pump(&mut ar, &mut bw, &last, &m.bytes_in);
    let down = pump(&mut br, &mut aw, &last, &m.bytes_out);
    let both = async { tokio::join!(up, down) };
    let watchdog = async {
        loop {
            let since = now_ms().saturating_sub(last.load(Relaxed));
            let left = (idle.as_millis() as u64).saturating_sub(since);
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(left.max(10))).await;
        }
    };
    tokio::select! {
        _ = both => {}
        _ = watchdog => {}
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, last: &AtomicU64, count: &AtomicU64)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        last.store(now_ms(), Relaxed);
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        count.fetch_add(n as u64, Relaxed);
        last.store(now_ms(), Relaxed);
    }
    // half-close: the other side sees EOF, and may still answer
    let _ = w.shutdown().await;
}
