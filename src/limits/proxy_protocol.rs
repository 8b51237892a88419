//! The PROXY protocol (HAProxy's spec, versions 1 and 2): a load balancer in front of tollgate
//! says who the client is before the connection's first byte of TLS or HTTP. Pure parsing plus
//! one reader that puts back whatever it read past the header.

use pingora::protocols::l4::stream::Stream as L4Stream;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1's longest header, CRLF included.
const V1_MAX: usize = 107;
/// The longest v2 header accepted (addresses plus TLVs such as a cloud load balancer's).
const V2_MAX: usize = 16 + 4096;

/// The longest PROXY header accepted (a v2 header with 4 KiB of TLVs).
pub const MAX_HEADER: usize = V2_MAX;

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes; `source` is the client (None for LOCAL / UNKNOWN: the
    /// connection's own peer stands).
    Done {
        len: usize,
        source: Option<SocketAddr>,
    },
}

pub fn parse(buf: &[u8]) -> Result<Parsed, String> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] == V2_SIG[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err("no PROXY protocol header".into())
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err("v1 header longer than 107 bytes".into());
        }
        return Ok(Parsed::Incomplete);
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err("v1 header longer than 107 bytes".into());
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "v1 header is not ASCII")?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.get(1).copied() {
        Some("UNKNOWN") => return Ok(Parsed::Done { len, source: None }),
        Some("TCP4") | Some("TCP6") => {}
        _ => return Err(format!("v1: unknown protocol in `{line}`")),
    }
    if parts.len() != 6 {
        return Err(format!(
            "v1: want 6 fields, got {} in `{line}`",
            parts.len()
        ));
    }
    let v6 = parts[1] == "TCP6";
    let ip = |s: &str| -> Result<IpAddr, String> {
        let ip: IpAddr = if v6 {
            IpAddr::V6(
                s.parse::<Ipv6Addr>()
                    .map_err(|_| format!("v1: bad IPv6 `{s}`"))?,
            )
        } else {
            IpAddr::V4(
                s.parse::<Ipv4Addr>()
                    .map_err(|_| format!("v1: bad IPv4 `{s}`"))?,
            )
        };
        Ok(ip)
    };
    let port = |s: &str| -> Result<u16, String> {
        // no sign, no leading zeros, 0..=65535
        if s.is_empty()
            || s.len() > 5
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(format!("v1: bad port `{s}`"));
        }
        s.parse::<u16>().map_err(|_| format!("v1: bad port `{s}`"))
    };
    let src = ip(parts[2])?;
    ip(parts[3])?;
    let sport = port(parts[4])?;
    port(parts[5])?;
    Ok(Parsed::Done {
        len,
        source: Some(SocketAddr::new(src, sport)),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, String> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(format!("v2: version {} is not 2", ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        c => return Err(format!("v2: unknown command {c}")),
    };
    let fam = buf[13];
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > V2_MAX {
        return Err(format!(
            "v2: header of {len} bytes is over the {V2_MAX} byte limit"
        ));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[16..len];
    if local {
        return Ok(Parsed::Done { len, source: None });
    }
    let source = match fam {
        // TCP and UDP over IPv4
        0x11 | 0x12 => {
            if a.len() < 12 {
                return Err("v2: IPv4 address block shorter than 12 bytes".into());
            }
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        0x21 | 0x22 => {
            if a.len() < 36 {
                return Err("v2: IPv6 address block shorter than 36 bytes".into());
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(o);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC or unix sockets: no IP to use, the connection's peer stands
        0x00 | 0x31 | 0x32 => None,
        f => return Err(format!("v2: unknown address family 0x{f:02x}")),
    };
    Ok(Parsed::Done { len, source })
}

/// Read a PROXY header from the start of `stream` within `deadline`. Bytes read past the
/// header are put back for the TLS or HTTP layer.
pub async fn read(stream: &mut L4Stream, deadline: Duration) -> Result<Option<SocketAddr>, String> {
    let work = async {
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed inside the PROXY header".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse(&buf)? {
                Parsed::Incomplete => continue,
                Parsed::Done { len, source } => {
                    if buf.len() > len {
                        stream.rewind(&buf[len..]);
                    }
                    return Ok(source);
                }
            }
        }
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| format!("no whole PROXY header within {deadline:?}"))?
}

/// A v1 (text) header for `src` → `dst`.
pub fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                v6 => v6,
            };
            (v6(s), v6(d))
        }
    };
    let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {fam} {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
}

/// A v2 header for `src` → `dst` (service ports' `send_proxy`, tests and tools).
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(len: usize, src: &str) -> Parsed {
        Parsed::Done {
            len,
            source: Some(src.parse().unwrap()),
        }
    }

    #[test]
    fn headers_we_write_parse_back() {
        for (src, dst) in [
            ("192.0.2.10:56324", "198.51.100.1:3306"),
            ("[2001:db8::1]:4000", "[2001:db8::2]:443"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for h in [v1_header(src, dst), v2_header(src, dst)] {
                assert_eq!(parse(&h).unwrap(), done(h.len(), &src.to_string()));
            }
        }
        // mixed families: written as IPv6, the IPv4 client mapped
        let h = v1_header(
            "192.0.2.1:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
        );
        assert!(h.starts_with(b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2"));
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(parse(h).unwrap(), done(46, "192.0.2.10:56324"));
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(parse(h).unwrap(), done(h.len(), "[2001:db8::1]:4000"));
        let h = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(
            parse(h).unwrap(),
            Parsed::Done {
                len: h.len(),
                source: None
            }
        );
        // partial headers ask for more
        for cut in [1, 5, 10, 30] {
            assert_eq!(
                parse(&b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\r\n"[..cut]).unwrap(),
                Parsed::Incomplete
            );
        }
    }

    #[test]
    fn v1_malformed_headers_are_refused() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.10 198.51.100.1 56324\r\n", // a field short
            b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443 x\r\n", // a field long
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  // v6 address in TCP4
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",     // v4 address in TCP6
            b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 443\r\n", // port out of range
            b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 443\r\n", // signed port
            b"PROXY TCP4 192.0.2.10 198.51.100.1 0443 443\r\n", // leading zero
            b"PROXY TCP4  192.0.2.10 198.51.100.1 1 443\r\n", // double space
            b"PROXY UDP4 192.0.2.10 198.51.100.1 1 443\r\n", // not a v1 protocol
            b"GET / HTTP/1.1\r\n",                           // no header at all
            b"\x16\x03\x01\x02\x00",                         // a TLS ClientHello
        ];
        for b in bad {
            assert!(parse(b).is_err(), "{}", String::from_utf8_lossy(b));
        }
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(120, b'1');
        assert!(parse(&long).is_err(), "over 107 bytes without CRLF");
    }

    #[test]
    fn v2_round_trip_local_and_malformed() {
        let h = v2_header(
            "192.0.2.10:56324".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        assert_eq!(h.len(), 28);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(parse(&with_data).unwrap(), done(28, "192.0.2.10:56324"));
        for cut in [1, 11, 12, 15, 16, 27] {
            assert_eq!(
                parse(&h[..cut]).unwrap(),
                Parsed::Incomplete,
                "cut at {cut}"
            );
        }
        let h6 = v2_header(
            "[2001:db8::7]:1000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        );
        assert_eq!(parse(&h6).unwrap(), done(52, "[2001:db8::7]:1000"));

        // LOCAL (health checks from the balancer itself): the socket peer stands
        let mut local = h.clone();
        local[12] = 0x20;
        assert_eq!(
            parse(&local).unwrap(),
            Parsed::Done {
                len: 28,
                source: None
            }
        );
        // TLVs after the addresses are skipped
        let mut tlv = h.clone();
        tlv[15] = 12 + 7;
        tlv.extend_from_slice(&[0x04, 0x00, 0x04, b'a', b'b', b'c', b'd']);
        assert_eq!(parse(&tlv).unwrap(), done(35, "192.0.2.10:56324"));

        let mut v1 = h.clone();
        v1[12] = 0x11; // version 1 in a v2 header
        assert!(parse(&v1).is_err());
        let mut cmd = h.clone();
        cmd[12] = 0x2f; // unknown command
        assert!(parse(&cmd).is_err());
        let mut fam = h.clone();
        fam[13] = 0x99; // unknown family
        assert!(parse(&fam).is_err());
        let mut short = h.clone();
        short[15] = 4; // IPv4 block too short
        short.truncate(20);
        assert!(parse(&short).is_err());
        let mut huge = h.clone();
        huge[14] = 0xff;
        huge[15] = 0xff; // 64 KiB of TLVs
        assert!(parse(&huge).is_err());
        let mut sig = h.clone();
        sig[3] = b'x'; // broken signature
        assert!(parse(&sig).is_err());
    }
}
