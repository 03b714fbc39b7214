//! Raw h2 after a genuine TLS-MA handshake: a well-formed request is served, streams are limited
//! to 100 per connection, and malformed requests, bodies longer than their content-length and
//! header lists over `max_header_bytes` are refused and never forwarded; without ALPN a client is
//! served HTTP/1.1 (the protocol is ALPN's choice, never guessed from the first bytes).

mod common;

use std::sync::Arc;

use common::raw_h2::*;
use common::*;

#[tokio::test]
async fn a_well_formed_h2_request_is_served() {
    let rig = Rig::start().await;
    let mut h2 = H2::open(&rig).await;
    h2.send_headers(1, &h2_block("GET", "/metadata", &[]), true)
        .await;
    assert_eq!(h2.outcome(1).await, H2Outcome::Status(Some(200)));
    h2.send_headers(3, &h2_block("GET", "/a/../metadata", &[]), true)
        .await;
    assert_eq!(h2.outcome(3).await, H2Outcome::Status(Some(400)));
    assert_eq!(rig.upstream.count(), 1);
}

#[tokio::test]
async fn an_h2_connection_is_limited_to_100_concurrent_streams() {
    let rig = Rig::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    rig.upstream
        .set_reply(Reply::Gated(gate.clone(), http::StatusCode::OK));
    let mut h2 = H2::open(&rig).await;
    assert!(
        h2.settings
            .contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 100)),
        "{:?}",
        h2.settings
    );
    // 101 requests at once, ignoring the advertised limit; the upstream holds every answer.
    for n in 0..101u32 {
        h2.send_headers(2 * n + 1, &h2_block("GET", "/metadata", &[]), true)
            .await;
    }
    assert_eq!(h2.outcome(201).await, H2Outcome::Reset(REFUSED_STREAM));
    rig.upstream.wait_for_count(100).await;
    assert_eq!(rig.upstream.count(), 100);
    gate.add_permits(100);
    for n in 0..100u32 {
        assert_eq!(
            h2.outcome(2 * n + 1).await,
            H2Outcome::Status(Some(200)),
            "stream {}",
            2 * n + 1
        );
    }
    assert_eq!(
        rig.upstream.count(),
        100,
        "the refused stream was never forwarded"
    );
}

#[tokio::test]
async fn malformed_h2_requests_are_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let cases: [(&str, &str, &[Field]); 11] = [
        (
            "CRLF in a value",
            "/metadata",
            &[(b"x-note", b"a\r\ntransfer-encoding: chunked")],
        ),
        ("LF in a value", "/metadata", &[(b"x-note", b"a\nb")]),
        ("NUL in a value", "/metadata", &[(b"x-note", b"a\0b")]),
        (
            "transfer-encoding",
            "/metadata",
            &[(b"transfer-encoding", b"chunked")],
        ),
        ("connection", "/metadata", &[(b"connection", b"keep-alive")]),
        ("te other than trailers", "/metadata", &[(b"te", b"gzip")]),
        ("uppercase name", "/metadata", &[(b"X-Note", b"a")]),
        ("space in a name", "/metadata", &[(b"x note", b"a")]),
        ("unknown pseudo-header", "/metadata", &[(b":evil", b"1")]),
        ("dot segments", "/a/../metadata", &[]),
        ("relative path", "metadata", &[]),
    ];
    for (case, path, extra) in cases {
        let mut h2 = H2::open(&rig).await;
        h2.send_headers(1, &h2_block("GET", path, extra), true)
            .await;
        let outcome = h2.outcome(1).await;
        outcome.assert_refused(case);
        assert_eq!(rig.upstream.count(), 0, "{case}: reached the upstream");
    }
}

#[tokio::test]
async fn an_h2_body_longer_than_its_content_length_is_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let mut h2 = H2::open(&rig).await;
    let block = h2_block("POST", "/$process-message", &[(b"content-length", b"5")]);
    h2.send_headers(1, &block, false).await;
    h2.send(DATA, END_STREAM, 1, b"hello, and a smuggled tail")
        .await;
    let outcome = h2.outcome(1).await;
    outcome.assert_refused("body longer than content-length");
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn an_h2_header_list_over_max_header_bytes_is_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let mut h2 = H2::open(&rig).await;
    let big = vec![b'a'; 40 * 1024];
    h2.send_headers(1, &h2_block("GET", "/metadata", &[(b"x-note", &big)]), true)
        .await;
    let outcome = h2.outcome(1).await;
    assert_eq!(outcome, H2Outcome::Status(Some(431)), "h2's own answer");
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_client_that_offers_no_alpn_is_served_http1_and_an_h2_preface_is_not_taken_for_h2() {
    let rig = Rig::start().await;
    let no_alpn = rig.pki.client_config_with(
        Some(ClientCert::Proxy),
        &[&rustls::version::TLS13],
        Vec::new(),
    );
    // HTTP/1.1 without ALPN: served.
    let reply = send(rig.gateway.addr, no_alpn.clone(), metadata())
        .await
        .expect("HTTP/1.1 without ALPN is served");
    assert_eq!(reply.status, 200);
    assert_eq!(rig.upstream.count(), 1);
    // The h2 connection preface without ALPN is read as HTTP/1.1 (and refused by hyper): the
    // protocol is the one ALPN chose, never guessed from the first bytes.
    let tcp = tokio::net::TcpStream::connect(rig.gateway.addr)
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(no_alpn)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut answer),
    )
    .await
    .expect("the gateway answers or closes");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 "),
        "an HTTP/1.1 answer or a closed connection, never h2 frames: {text:?}"
    );
    assert_eq!(rig.upstream.count(), 1, "nothing forwarded");
}
