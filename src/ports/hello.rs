//! The server name of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), read from the first
//! bytes of a connection without consuming them, for TLS passthrough. Pure.

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not all of the ClientHello yet: read more.
    Incomplete,
    /// A ClientHello, and the name it asks for (`None`: no SNI extension).
    Name(Option<String>),
    /// Not TLS, or a ClientHello that does not parse.
    Invalid(&'static str),
}

/// The most bytes a ClientHello may take before we give up (many records are not read).
pub const MAX_HELLO: usize = 16 * 1024;

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Read the server name from `buf`, the first bytes the client sent.
pub fn server_name(buf: &[u8]) -> Hello {
    // the handshake may span several records: gather their payloads
    let mut hs = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            break;
        }
        if rest[0] != 22 {
            return Hello::Invalid("not a TLS handshake record");
        }
        if rest[1] != 3 {
            return Hello::Invalid("not a TLS record version");
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Hello::Invalid("a TLS record of an impossible length");
        }
        if rest.len() < 5 + len {
            hs.extend_from_slice(&rest[5..]);
            break;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs.len() >= 4 {
            let want = 4 + ((hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize);
            if hs.len() >= want {
                break;
            }
        }
    }
    if buf.first().is_some_and(|b| *b != 22) {
        return Hello::Invalid("not a TLS handshake record");
    }
    let mut c = Cursor(&hs);
    match c.u8() {
        None => return Hello::Incomplete,
        Some(1) => {}
        Some(_) => return Hello::Invalid("the first handshake message is not a ClientHello"),
    }
    let Some(len) = c.u24() else {
        return Hello::Incomplete;
    };
    if len > MAX_HELLO {
        return Hello::Invalid("a ClientHello over 16 KiB");
    }
    let Some(body) = c.take(len) else {
        return if buf.len() >= MAX_HELLO + 5 {
            Hello::Invalid("a ClientHello over 16 KiB")
        } else {
            Hello::Incomplete
        };
    };
    parse_hello(body)
        .map(Hello::Name)
        .unwrap_or(Hello::Invalid("a ClientHello that does not parse"))
}

fn parse_hello(body: &[u8]) -> Option<Option<String>> {
    let mut c = Cursor(body);
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    c.vec8()?; // legacy_session_id
    c.vec16()?; // cipher_suites
    c.vec8()?; // legacy_compression_methods
    if c.0.is_empty() {
        return Some(None); // no extensions
    }
    let mut exts = Cursor(c.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); type 0 is a host name
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let t = list.u8()?;
            let name = list.vec16()?;
            if t == 0 {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return None;
                }
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, made by rustls for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn names_from_real_client_hellos() {
        let h = hello("DB.Example.com");
        assert_eq!(server_name(&h), Hello::Name(Some("db.example.com".into())));
        // every prefix is incomplete, never wrong
        for n in [0, 1, 5, 6, 40, h.len() - 1] {
            assert_eq!(server_name(&h[..n]), Hello::Incomplete, "{n}");
        }
        // an IP address: rustls sends no SNI
        assert_eq!(server_name(&hello("127.0.0.1")), Hello::Name(None));
        // the hello split over two records
        let body = &h[5..];
        let mut two = vec![22, 3, 1];
        two.extend_from_slice(&(10u16).to_be_bytes());
        two.extend_from_slice(&body[..10]);
        two.extend_from_slice(&[22, 3, 1]);
        two.extend_from_slice(&((body.len() - 10) as u16).to_be_bytes());
        two.extend_from_slice(&body[10..]);
        assert_eq!(
            server_name(&two),
            Hello::Name(Some("db.example.com".into()))
        );
    }

    #[test]
    fn what_is_not_a_hello_is_refused() {
        assert!(matches!(
            server_name(b"GET / HTTP/1.1\r\n"),
            Hello::Invalid(_)
        ));
        assert!(matches!(server_name(&[22, 3, 1, 0, 0]), Hello::Invalid(_)));
        // a handshake that is not a ClientHello
        assert!(matches!(
            server_name(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Hello::Invalid(_)
        ));
        // a name with bytes no host name has
        let mut h = hello("abc.test");
        let at = h.windows(8).position(|w| w == b"abc.test").unwrap();
        h[at] = b'/';
        assert!(matches!(server_name(&h), Hello::Invalid(_)));
        // a declared length that never ends
        let mut big = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        big.resize(5 + 0x4000, 0);
        assert!(matches!(server_name(&big), Hello::Invalid(_)));
    }
}
