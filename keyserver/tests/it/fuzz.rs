//! Fuzz-style robustness: oversized, truncated, malformed and random bodies and requests.
//! Every answer must be a 4xx (never a 5xx, never a crash), and the server must keep
//! serving: a known user still looks up and verifies afterwards.

use crate::common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

crate::on_both_backends!(garbage_bodies_get_4xx_and_the_server_keeps_serving);

/// A small deterministic PRNG (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Sends raw bytes on a fresh connection and returns the status code of the answer, if
/// one arrives within `wait` (the server may also just close, or wait for more bytes).
/// `half_close` closes our sending side after the bytes (the server then drops the
/// connection without answering, as a client that went away gets).
async fn raw_status(port: u16, request: &[u8], half_close: bool, wait: Duration) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // The server may answer and close before reading everything: ignore write errors.
    let _ = stream.write_all(request).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

fn assert_4xx(status: u16, what: &str) {
    assert!((400..500).contains(&status), "{what}: answered {status}");
}

async fn garbage_bodies_get_4xx_and_the_server_keeps_serving(backend: Backend) {
    let server = Server::start(backend).await;
    server.register_and_activate("victor").await;
    let (m, s) = alice_keys();
    let good = registration("walter", "walter@example.org", &m, &s);
    let mut rng = Rng(0x5eed_0f4e_5500);

    // Truncated JSON at many points.
    for cut in (0..good.len()).step_by(37) {
        let r = server.post_users(good[..cut].to_string()).await;
        assert_4xx(r.status().as_u16(), &format!("truncated at {cut}"));
    }
    // Random bytes of random lengths, including invalid UTF-8 and NULs.
    for i in 0..150 {
        let len = rng.below(3000);
        let r = server.post_users(rng.bytes(len)).await;
        assert_4xx(r.status().as_u16(), &format!("random body {i}"));
    }
    // Random byte flips of a good registration: 4xx, or 201 if it stayed valid.
    for i in 0..150 {
        let mut body = good.clone().into_bytes();
        for _ in 0..=rng.below(4) {
            let at = rng.below(body.len());
            body[at] = rng.next() as u8;
        }
        let status = server.post_users(body.clone()).await.status().as_u16();
        assert!(
            status == 201 || (400..500).contains(&status),
            "mutation {i}: answered {status} to {:?}\n{}",
            String::from_utf8_lossy(&body),
            server.log_text()
        );
    }
    // Structurally hostile JSON.
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let hostile: Vec<(String, &str)> = vec![
        (nested, "deep nesting"),
        ("{\"username\":\"a\"".repeat(1000), "repeated prefix"),
        (
            format!("{{\"username\":\"{}\"}}", "\\u0000".repeat(5000)),
            "escaped NULs",
        ),
        (
            "{\"username\":\"\\ud800\",\"email\":1}".into(),
            "lone surrogate",
        ),
        ("null".into(), "null"),
        ("\"just a string\"".into(), "a string"),
        ("{}".into(), "empty object"),
        ("1e999999".into(), "huge number"),
        (
            good.replace("walter@example.org", &"x".repeat(60_000)),
            "huge field under the cap",
        ),
    ];
    for (body, what) in hostile {
        let r = server.post_users(body).await;
        assert_4xx(r.status().as_u16(), what);
    }
    // Oversized bodies, declared and not.
    let r = server.post_users(vec![b'{'; 200_000]).await;
    assert_eq!(r.status(), 413);

    // Raw HTTP: a body shorter than declared, then the connection closes.
    let truncated = format!(
        "POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{}",
        &good[..100]
    );
    if let Some(status) = raw_status(
        server.port,
        truncated.as_bytes(),
        true,
        Duration::from_secs(30),
    )
    .await
    {
        assert_4xx(status, "truncated body");
    }
    // Raw HTTP: not HTTP at all.
    for i in 0..20 {
        let len = 1 + rng.below(500);
        if let Some(status) =
            raw_status(server.port, &rng.bytes(len), false, Duration::from_secs(2)).await
        {
            assert_4xx(status, &format!("random request {i}"));
        }
    }
    // Raw HTTP: a huge header block.
    let huge_header = format!(
        "GET /users/victor HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1_000_000)
    );
    if let Some(status) = raw_status(
        server.port,
        huge_header.as_bytes(),
        false,
        Duration::from_secs(30),
    )
    .await
    {
        assert_4xx(status, "huge header");
    }

    // Still serving, and still right.
    assert_eq!(server.get("/healthz").await.status(), 200);
    server.lookup_verified("victor").await;
    server.register("walter_2").await;
}

#[tokio::test]
async fn chunked_body_over_the_cap() {
    let server = Server::start(Backend::Sqlite).await;
    // No Content-Length: the cap is counted while reading.
    let mut request = b"POST /users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..100 {
        request.extend_from_slice(b"400\r\n");
        request.extend_from_slice(&[b' '; 1024]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(
        raw_status(server.port, &request, false, READY_TIMEOUT).await,
        Some(413)
    );
    // A chunked body under the cap is read.
    let body = b"{\"username\":\"x\"}";
    let mut request = b"POST /users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    request.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(
        raw_status(server.port, &request, false, READY_TIMEOUT).await,
        Some(400)
    );
    assert_eq!(server.get("/healthz").await.status(), 200);
}
