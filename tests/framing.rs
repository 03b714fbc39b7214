//! HTTP/1.1 framing after a genuine TLS-MA handshake: hand-made bytes on a real TLS stream, the
//! way a buggy or subverted peer holding the proxy's certificate could send them. Every hostile
//! framing is refused (a 4xx, or the connection closed) and the legacy receiver never sees it;
//! for smuggling attempts, it sees exactly the one legitimate request, re-serialised, with the
//! body the gateway approved ([`RawUpstream`] records the exact bytes it gets).

mod common;

use common::raw_http::*;
use common::*;

// ---- HTTP/1.1 framing --------------------------------------------------------------------------

#[tokio::test]
async fn conflicting_or_invalid_content_length_is_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let mut cases = Vec::new();
    for (case, framing) in [
        (
            "two different lengths",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
        ),
        ("two lengths in one field", "Content-Length: 5, 6\r\n"),
        ("a repeated length in one field", "Content-Length: 5, 5\r\n"),
        ("negative", "Content-Length: -5\r\n"),
        ("signed", "Content-Length: +5\r\n"),
        ("hexadecimal", "Content-Length: 0x5\r\n"),
        ("decimal point", "Content-Length: 5.0\r\n"),
        ("inner space", "Content-Length: 5 5\r\n"),
        ("empty", "Content-Length: \r\n"),
        (
            "overflowing u64",
            "Content-Length: 99999999999999999999999\r\n",
        ),
        ("space before the colon", "Content-Length : 5\r\n"),
    ] {
        cases.push((case, request_bytes(POST, framing, b"hello")));
    }
    assert_all_refused(&rig, 400, &cases).await;
}

#[tokio::test]
async fn obfuscated_transfer_encoding_is_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let body = b"5\r\nhello\r\n0\r\n\r\n";
    let mut cases = Vec::new();
    for (case, framing) in [
        ("xchunked", "Transfer-Encoding: xchunked\r\n"),
        (
            "chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        ("identity", "Transfer-Encoding: identity\r\n"),
        (
            "chunked then identity fields",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        ),
        ("chunked-false", "Transfer-Encoding: chunked-false\r\n"),
        ("quoted", "Transfer-Encoding: \"chunked\"\r\n"),
        ("space before the colon", "Transfer-Encoding : chunked\r\n"),
        (
            "folded onto the next line",
            "Transfer-Encoding:\r\n chunked\r\n",
        ),
        ("HTTP/1.0 with chunked", "Transfer-Encoding: chunked\r\n"),
    ] {
        let line = if case.starts_with("HTTP/1.0") {
            "POST /$process-message HTTP/1.0"
        } else {
            POST
        };
        cases.push((case, request_bytes(line, framing, body)));
    }
    assert_all_refused(&rig, 400, &cases).await;
}

#[tokio::test]
async fn padded_or_recased_chunked_is_read_as_chunked_and_reaches_the_upstream_re_framed() {
    let (rig, upstream) = raw_rig(RawReply::Ok, |_| {}).await;
    for (n, framing) in [
        "Transfer-Encoding: chunked \r\n",
        "Transfer-Encoding: \tchunked\r\n",
        "Transfer-Encoding: CHUNKED\r\n",
        "transfer-encoding: Chunked\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let outcome = exchange(
            &rig,
            &request_bytes(POST, framing, b"5\r\nhello\r\n0\r\n\r\n"),
        )
        .await;
        assert_eq!(outcome.status(), Some(200), "{framing:?}: {outcome:?}");
        let seen = &upstream.received()[n];
        assert_eq!(seen.body, b"hello", "{framing:?}");
        assert_eq!(seen.headers("content-length"), ["5"], "{framing:?}");
        assert!(seen.headers("transfer-encoding").is_empty(), "{framing:?}");
    }
    assert_eq!(upstream.received().len(), 4);
}

#[tokio::test]
async fn obsolete_line_folding_bare_cr_and_control_bytes_in_headers_are_refused() {
    let rig = Rig::start().await;
    let mut cases = Vec::new();
    for (case, extra) in [
        (
            "obs-fold with a space",
            &b"X-Note: first\r\n second\r\n"[..],
        ),
        ("obs-fold with a tab", b"X-Note: first\r\n\tsecond\r\n"),
        ("bare CR inside a value", b"X-Note: first\rsecond\r\n"),
        (
            "bare CR ending a line",
            b"X-Note: first\rX-Other: second\r\n",
        ),
        ("NUL in a value", b"X-Note: fir\0st\r\n"),
        ("SOH in a value", b"X-Note: fir\x01st\r\n"),
        ("ESC in a value", b"X-Note: fir\x1bst\r\n"),
        ("DEL in a value", b"X-Note: fir\x7fst\r\n"),
        ("NUL in a name", b"X-No\0te: first\r\n"),
        ("space in a name", b"X Note: first\r\n"),
        ("no colon", b"X-Note first\r\n"),
    ] {
        let mut bytes = request_bytes(GET, "", b"");
        // Splice the hostile field in before the blank line.
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(extra);
        bytes.extend_from_slice(b"\r\n");
        cases.push((case, bytes));
    }
    cases.push((
        "bare CR in the request line",
        b"GET /metadata\rHTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
    ));
    cases.push((
        "two spaces in the request line",
        request_bytes("GET  /metadata HTTP/1.1", "", b""),
    ));
    assert_all_refused(&rig, 400, &cases).await;
}

#[tokio::test]
async fn http_0_9_and_unknown_versions_are_refused() {
    let rig = Rig::start().await;
    let mut cases = vec![
        ("HTTP/0.9", b"GET /metadata\r\n".to_vec()),
        (
            "HTTP/0.9 then blank line",
            b"GET /metadata\r\n\r\n".to_vec(),
        ),
    ];
    for version in [
        "HTTP/1.2",
        "HTTP/2.0",
        "HTTP/2",
        "HTTP/3",
        "HTTP/0.9",
        "http/1.1",
        "HTTPS/1.1",
        "HTTP/1.1.1",
        "HTTP/11",
    ] {
        cases.push((
            version,
            request_bytes(&format!("GET /metadata {version}"), "", b""),
        ));
    }
    assert_all_refused(&rig, 400, &cases).await;
}

#[tokio::test]
async fn connect_trace_and_extension_methods_are_refused_even_under_an_extra_prefix() {
    let rig = Rig::start_with(|s| s.bars.extra_prefixes = vec!["/Patient".into()]).await;
    assert_all_refused_by_the_gateway(&rig, 400, &["CONNECT evil.example:443 HTTP/1.1"]).await;
    assert_all_refused_by_the_gateway(
        &rig,
        405,
        &[
            "CONNECT /metadata HTTP/1.1",
            "CONNECT /Patient/1 HTTP/1.1",
            "TRACE /metadata HTTP/1.1",
            "TRACE /Patient/1 HTTP/1.1",
            "TRACK /Patient/1 HTTP/1.1",
            "PROPFIND /Patient/1 HTTP/1.1",
            "MOVE /Patient/1 HTTP/1.1",
        ],
    )
    .await;
}

#[tokio::test]
async fn absolute_form_targets_are_refused() {
    let rig = Rig::start().await;
    assert_all_refused_by_the_gateway(
        &rig,
        400,
        &[
            "GET http://evil.example/metadata HTTP/1.1",
            "GET https://evil.example:8443/metadata HTTP/1.1",
            "GET https://localhost/metadata HTTP/1.1",
            "POST http://evil.example/$process-message HTTP/1.1",
        ],
    )
    .await;
}

#[tokio::test]
async fn dot_segments_and_encoded_dots_in_the_path_are_refused() {
    let rig = Rig::start().await;
    let lines: Vec<String> = [
        "/a/../metadata",
        "/./metadata",
        "/metadata/.",
        "/metadata/..",
        "/%2e%2e/metadata",
        "/%2E%2E/metadata",
        "/.%2e/metadata",
        "/%2e/metadata",
        "/%252e%252e/metadata",
        "/Appointment/..%2f..%2fmetadata",
        "/..;/metadata",
        "/a\\..\\metadata",
        "//metadata",
        "/metadata%00",
        "/%u002e%u002e/metadata",
    ]
    .iter()
    .map(|path| format!("GET {path} HTTP/1.1"))
    .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert_all_refused_by_the_gateway(&rig, 400, &lines).await;
    // Raw non-ASCII bytes in the target do not even parse as a URI: hyper refuses them.
    let cases = [(
        "non-ASCII",
        request_bytes("GET /metad\u{e0}ta HTTP/1.1", "", b""),
    )];
    assert_all_refused(&rig, 400, &cases).await;
}

/// Sends a request with both framings on a kept-alive connection: 400 as an OperationOutcome with
/// the ids echoed, the connection closed, nothing forwarded (RFC 9112 §6.1; nginx answers 400 too).
async fn assert_both_framings_refused(framing: &str, body: &[u8]) {
    let (rig, upstream) = raw_rig(RawReply::Ok, |_| {}).await;
    let mut conn = open(&rig).await;
    // A clean request first: the framing watch follows a kept-alive connection.
    let first = conn
        .exchange(&request_bytes(POST, "Content-Length: 2\r\n", b"{}"))
        .await;
    assert_eq!(first.status(), Some(200), "{first:?}");
    let id = new_id();
    let outcome = conn
        .exchange(&request_bytes_with_id(POST, &id, framing, body))
        .await;
    let Outcome::Answer(message) = outcome else {
        panic!("expected a 400 answer, got {outcome:?}");
    };
    assert_eq!(message.status(), 400, "{}", message.head);
    let text = String::from_utf8_lossy(&message.body);
    assert!(text.contains("REC_BAD_REQUEST"), "{text}");
    assert!(
        text.contains("Content-Length and Transfer-Encoding must not both be sent"),
        "{text}"
    );
    assert_eq!(message.headers("x-request-id"), [id]);
    assert!(
        conn.is_closed().await,
        "a request with both framings closes the connection"
    );
    assert_eq!(
        upstream.received().len(),
        1,
        "only the clean request reaches the upstream; the smuggled one never"
    );
}

#[tokio::test]
async fn cl_te_smuggling_is_refused_with_400_and_the_connection_closed() {
    // A front end reading Content-Length would see the hidden request as this one's body tail; a
    // back end reading chunked, as the next request.
    let hidden = request_bytes(
        "POST /$process-message HTTP/1.1",
        "Content-Length: 6\r\n",
        b"HIDDEN",
    );
    let mut body = b"0\r\n\r\n".to_vec();
    body.extend_from_slice(&hidden);
    let framing = format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        body.len()
    );
    assert_both_framings_refused(&framing, &body).await;
}

#[tokio::test]
async fn te_cl_smuggling_is_refused_with_400_and_the_connection_closed() {
    // A back end reading Content-Length (4) would take the chunk's tail as a second request.
    let hidden = request_bytes("GET /metadata HTTP/1.1", "", b"");
    let mut body = format!("{:x}\r\n", hidden.len()).into_bytes();
    body.extend_from_slice(&hidden);
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_both_framings_refused("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", &body)
        .await;
}

#[tokio::test]
async fn malformed_chunked_bodies_are_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let mut cases = Vec::new();
    for (case, body) in [
        ("negative size", &b"-5\r\nhello\r\n0\r\n\r\n"[..]),
        ("0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
        (
            "overflowing size",
            b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        ("data longer than its size", b"3\r\nhello\r\n0\r\n\r\n"),
        ("no CRLF after the data", b"5\r\nhelloX0\r\n\r\n"),
        ("non-hex size", b"g\r\nhello\r\n0\r\n\r\n"),
        ("bare LF after the size", b"5\nhello\r\n0\r\n\r\n"),
    ] {
        cases.push((
            case,
            request_bytes(POST, "Transfer-Encoding: chunked\r\n", body),
        ));
    }
    assert_all_refused(&rig, 400, &cases).await;
}

// ---- what the legacy receiver gets: always re-serialised ---------------------------------------

/// The header names of a request as the upstream received them.
fn names(seen: &Message) -> Vec<String> {
    seen.header_lines()
        .iter()
        .map(|l| l.split_once(':').expect("name: value").0.to_string())
        .collect()
}

#[tokio::test]
async fn the_upstream_gets_lowercase_trimmed_headers_and_exactly_one_content_length() {
    let (rig, upstream) = raw_rig(RawReply::Ok, |_| {}).await;
    let framing =
        "X-CUSTOM-Header: \t  padded   value \t\r\nContent-Length: 5\r\ncontent-LENGTH: 5\r\n";
    let outcome = exchange(&rig, &request_bytes(POST, framing, b"hello")).await;
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = &upstream.received()[0];
    for name in names(seen) {
        assert_eq!(name, name.to_ascii_lowercase(), "{}", seen.head);
    }
    assert!(
        seen.header_lines()
            .contains(&"x-custom-header: padded   value"),
        "{}",
        seen.head
    );
    assert_eq!(seen.headers("content-length"), ["5"]);
    assert!(seen.headers("transfer-encoding").is_empty());
    assert_eq!(seen.body, b"hello");
    assert!(
        seen.head
            .split("\r\n")
            .all(|l| !l.contains('\n') && !l.contains('\r')),
        "CRLF line endings only"
    );
}

#[tokio::test]
async fn bare_lf_line_endings_reach_the_upstream_as_crlf() {
    let (rig, upstream) = raw_rig(RawReply::Ok, |_| {}).await;
    let bytes = String::from_utf8(request_bytes(GET, "", b""))
        .unwrap()
        .replace("\r\n", "\n");
    // hyper (httparse) accepts LF-only line endings, as RFC 9112 §2.2 allows; harmless here
    // because the upstream never sees the client's bytes, only hyper's re-serialisation.
    let outcome = exchange(&rig, bytes.as_bytes()).await;
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = &upstream.received()[0];
    let head = &seen.raw[..seen.raw.len() - seen.body.len()];
    let bare_lf = head
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
    assert!(!bare_lf, "{}", seen.head);
}

#[tokio::test]
async fn a_chunked_body_with_extensions_and_trailers_reaches_the_upstream_as_plain_bytes() {
    let (rig, upstream) = raw_rig(RawReply::Ok, |_| {}).await;
    let body = b"3;name=val\r\nabc\r\n004\r\ndefg\r\n0\r\nX-Client-Cert-Subject: CN=evil\r\nTransfer-Encoding: chunked\r\n\r\n";
    let outcome = exchange(
        &rig,
        &request_bytes(POST, "Transfer-Encoding: chunked\r\n", body),
    )
    .await;
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = &upstream.received()[0];
    assert_eq!(seen.body, b"abcdefg");
    assert_eq!(seen.headers("content-length"), ["7"]);
    assert!(seen.headers("transfer-encoding").is_empty());
    let raw = String::from_utf8_lossy(&seen.raw);
    assert!(!raw.contains("name=val") && !raw.contains("evil"), "{raw}");
}

#[tokio::test]
async fn a_streamed_chunked_body_reaches_the_upstream_re_chunked_without_extensions_or_trailers() {
    // With POST not deduplicated the body streams through instead of being buffered.
    let (rig, upstream) = raw_rig(RawReply::Ok, |s| s.dedup.methods.clear()).await;
    let body = b"3;name=val\r\nabc\r\n004\r\ndefg\r\n0\r\nX-Client-Cert-Subject: CN=evil\r\n\r\n";
    let outcome = exchange(
        &rig,
        &request_bytes(POST, "Transfer-Encoding: chunked\r\n", body),
    )
    .await;
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = &upstream.received()[0];
    assert_eq!(seen.body, b"abcdefg");
    assert_eq!(seen.headers("transfer-encoding"), ["chunked"]);
    assert!(seen.headers("content-length").is_empty());
    let raw = String::from_utf8_lossy(&seen.raw);
    assert!(!raw.contains("name=val"), "{raw}");
    assert!(
        !raw.contains("evil"),
        "a trailer must not reach the upstream: {raw}"
    );
}

#[tokio::test]
async fn header_names_with_underscores_never_reach_the_upstream() {
    // CGI-style receivers (PHP, WSGI, Rack) read `X_Client_Cert_Subject` and
    // `X-Client-Cert-Subject` as the same HTTP_X_CLIENT_CERT_SUBJECT: an underscore twin would
    // slip past the gateway's own headers and the validated NHSD ones.
    let (rig, upstream) = raw_rig(RawReply::Ok, |_| {}).await;
    let extra = "X_Client_Cert_Subject: CN=evil\r\nX_Forwarded_For: 6.6.6.6\r\nNHSD_Target_Identifier: evil\r\nX_BaRS_Ods_Code: evil\r\n";
    let outcome = exchange(&rig, &request_bytes(GET, extra, b"")).await;
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = &upstream.received()[0];
    for name in names(seen) {
        assert!(!name.contains('_'), "{name} reached the upstream");
    }
    assert!(
        !seen.head.contains("evil") && !seen.head.contains("6.6.6.6"),
        "{}",
        seen.head
    );
}
