//! A TLS client for `benches/handshakes.py`: opens N connections to 127.0.0.1:PORT one after
//! another, each sending one request with `Connection: close` and reading the answer, offering
//! only the key exchange groups asked for (`X25519MLKEM768`, which Python's ssl cannot offer,
//! or `X25519`), with a full handshake each time or resuming the previous session.
//!
//!     tls_client PORT N X25519MLKEM768|X25519 full|resumed
//!
//! Prints how many connections resumed and the group of the last one. The server's
//! certificate is not verified (a loopback benchmark; its signature is).
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::ServerName;
use std::io::{Read, Write};
use std::sync::Arc;
use tollgate_testkit::AnyCert;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 || args[1] == "--bench" {
        eprintln!("usage: tls_client PORT N X25519MLKEM768|X25519 full|resumed");
        return;
    }
    let port: u16 = args[1].parse().expect("a port");
    let n: usize = args[2].parse().expect("a count");
    let group = match args[3].as_str() {
        "X25519MLKEM768" => aws_lc_rs::kx_group::X25519MLKEM768,
        "X25519" => aws_lc_rs::kx_group::X25519,
        g => panic!("unknown group {g}"),
    };
    let resume = args[4] == "resumed";
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = vec![group];
    let provider = Arc::new(provider);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    let cfg = Arc::new(cfg);
    let name = ServerName::try_from("bench.local").expect("a name");
    let (mut resumed, mut last) = (0usize, String::new());
    for _ in 0..n {
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let conn = rustls::ClientConnection::new(cfg.clone(), name.clone()).expect("a client");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n\r\n")
            .expect("the request");
        let mut answer = Vec::new();
        // the server closes after its answer; an unclean close still ends the read
        let _ = tls.read_to_end(&mut answer);
        assert!(answer.starts_with(b"HTTP/1.1 200"), "an answer");
        if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            resumed += 1;
        }
        last = format!(
            "{:?}",
            tls.conn.negotiated_key_exchange_group().map(|g| g.name())
        );
    }
    println!("resumed {resumed} of {n}; group {last}");
}
