//! Hardening (issue 9): hostile bytes after a genuine TLS-MA handshake. Every test here writes
//! hand-made HTTP/1.1 bytes (or raw h2 frames) on a real TLS stream, the way a buggy or subverted
//! peer holding the proxy's certificate could, and asserts the gateway refuses (a 4xx, or the
//! connection closed) and the legacy receiver never sees the request; for smuggling attempts, that
//! it sees exactly the one legitimate request, re-serialised, with the body the gateway approved.
//!
//! A raw TCP "upstream" (`RawUpstream`) records the exact bytes the legacy receiver would get, so
//! no client framing oddity can hide behind a lenient HTTP parser on the receiving side.
//!
//! `five_hundred_refused_handshakes_do_not_grow_memory_without_bound` measures this process's RSS,
//! so it runs alone: every other test holds a shared `serial_guard()`, that one the exclusive one.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify, RwLock, RwLockReadGuard};
use tokio::task::JoinHandle;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Safety net only: every outcome here arrives at once or after a short configured timeout, so
/// this never elapses in a passing run.
const SAFETY_NET: Duration = Duration::from_secs(10);

/// Shared by every test, taken exclusively by the memory test (see the file header).
static MEMORY_QUIET: RwLock<()> = RwLock::const_new(());

async fn serial_guard() -> RwLockReadGuard<'static, ()> {
    MEMORY_QUIET.read().await
}

// ---- raw HTTP/1.1 on the wire -----------------------------------------------------------------

/// A TLS-MA connection with the BaRS proxy's certificate (ALPN `http/1.1`).
async fn open(rig: &Rig) -> Reader<Tls> {
    open_with(rig, rig.pki.client_config(Some(ClientCert::Proxy))).await
}

async fn open_with(rig: &Rig, config: Arc<rustls::ClientConfig>) -> Reader<Tls> {
    let tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS-MA handshake");
    Reader::new(tls)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The BaRS example header set with a fresh X-Request-Id, as CRLF-terminated lines.
fn bars_lines(id: &str) -> String {
    let mut lines = String::new();
    for (name, value) in example_headers().as_object().unwrap() {
        if name != "X-Request-Id" {
            lines.push_str(&format!("{name}: {}\r\n", value.as_str().unwrap()));
        }
    }
    lines.push_str(&format!("X-Request-Id: {id}\r\n"));
    lines
}

/// `request_line`, `Host`, the BaRS headers, then `extra` (CRLF-terminated lines), the blank
/// line, and `body`, byte for byte.
fn request_bytes(request_line: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    request_bytes_with_id(request_line, &new_id(), extra, body)
}

fn request_bytes_with_id(request_line: &str, id: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "{request_line}\r\nHost: localhost\r\n{}{extra}\r\n",
        bars_lines(id)
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

const POST: &str = "POST /$process-message HTTP/1.1";
const GET: &str = "GET /metadata HTTP/1.1";

/// One HTTP/1.1 message as it crossed the wire.
#[derive(Debug, Clone)]
struct Message {
    head: String,
    body: Vec<u8>,
    raw: Vec<u8>,
}

impl Message {
    /// The status of a response.
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {}", self.head))
    }

    /// The header lines exactly as sent (after the start line).
    fn header_lines(&self) -> Vec<&str> {
        self.head.split("\r\n").skip(1).collect()
    }

    /// Every value of a header (name compared case-insensitively).
    fn headers(&self, name: &str) -> Vec<String> {
        self.header_lines()
            .into_iter()
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }
}

/// Reads HTTP/1.1 messages off a byte stream, keeping what it read ahead.
struct Reader<S> {
    io: S,
    buf: Vec<u8>,
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<S> {
    fn new(io: S) -> Self {
        Reader {
            io,
            buf: Vec::new(),
        }
    }

    /// Reads more; false at EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    async fn fill_to(&mut self, len: usize) -> std::io::Result<()> {
        while self.buf.len() < len {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    async fn find_filling(&mut self, needle: &[u8], from: usize) -> std::io::Result<usize> {
        loop {
            if let Some(at) = find(&self.buf, needle, from) {
                return Ok(at);
            }
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// One message: `Ok(None)` at a clean EOF before its first byte. Bodies are framed by
    /// chunked, else Content-Length, else (responses only) the end of the stream.
    async fn message(&mut self, response: bool) -> std::io::Result<Option<Message>> {
        if self.buf.is_empty() && !self.fill().await? {
            return Ok(None);
        }
        let head_end = self.find_filling(b"\r\n\r\n", 0).await?;
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut message = Message {
            head,
            body: Vec::new(),
            raw: Vec::new(),
        };
        let mut pos = head_end + 4;
        let chunked = message
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let line_end = self.find_filling(b"\r\n", pos).await?;
                let line = String::from_utf8_lossy(&self.buf[pos..line_end]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                pos = line_end + 2;
                if size == 0 {
                    // Trailer fields, then the blank line.
                    loop {
                        let end = self.find_filling(b"\r\n", pos).await?;
                        let empty = end == pos;
                        pos = end + 2;
                        if empty {
                            break;
                        }
                    }
                    break;
                }
                self.fill_to(pos + size + 2).await?;
                message.body.extend_from_slice(&self.buf[pos..pos + size]);
                pos += size + 2;
            }
        } else if let Some(len) = message.header("content-length") {
            let len: usize = len.parse().unwrap();
            self.fill_to(pos + len).await?;
            message.body.extend_from_slice(&self.buf[pos..pos + len]);
            pos += len;
        } else if response && message.status() >= 200 && message.status() != 204 {
            while self.fill().await? {}
            message.body.extend_from_slice(&self.buf[pos..]);
            pos = self.buf.len();
        }
        message.raw = self.buf.drain(..pos).collect();
        Ok(Some(message))
    }
}

/// What a client got for one request.
#[derive(Debug)]
enum Outcome {
    /// A response.
    Answer(Message),
    /// The connection ended (EOF, reset, or TLS closed without close_notify) before any response;
    /// why, for assertion messages.
    Closed(#[allow(dead_code)] String),
}

impl Outcome {
    fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answer(m) => Some(m.status()),
            Outcome::Closed(_) => None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<S> {
    /// Writes `bytes` (a write error just means the gateway already closed) and reads one answer.
    async fn exchange(&mut self, bytes: &[u8]) -> Outcome {
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
        self.answer().await
    }

    async fn answer(&mut self) -> Outcome {
        match tokio::time::timeout(SAFETY_NET, self.message(true))
            .await
            .expect("the gateway answers or closes")
        {
            Ok(Some(m)) => Outcome::Answer(m),
            Ok(None) => Outcome::Closed("EOF".into()),
            Err(e) => Outcome::Closed(e.to_string()),
        }
    }

    /// Whether the peer has closed: true on EOF or an error, false if bytes arrive.
    async fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        match tokio::time::timeout(SAFETY_NET, self.fill())
            .await
            .expect("the gateway closes")
        {
            Ok(more) => !more,
            Err(_) => true,
        }
    }
}

/// Sends `bytes` on a fresh connection and returns the first answer.
async fn exchange(rig: &Rig, bytes: &[u8]) -> Outcome {
    open(rig).await.exchange(bytes).await
}

/// Asserts `outcome` is a refusal: a 4xx, or the connection closed without an answer.
fn assert_refused(outcome: &Outcome, case: &str) {
    if let Outcome::Answer(m) = outcome {
        assert!(
            (400..500).contains(&m.status()),
            "{case}: expected a 4xx or a closed connection, got {}",
            m.head
        );
    }
}

/// Each case on its own connection: refused with `status` (hyper's own answer: no body, no ids)
/// and the upstream never called.
async fn assert_all_refused(rig: &Rig, status: u16, cases: &[(&str, Vec<u8>)]) {
    for (case, bytes) in cases {
        let outcome = exchange(rig, bytes).await;
        assert_refused(&outcome, case);
        assert_eq!(outcome.status(), Some(status), "{case}: {outcome:?}");
        assert_eq!(rig.upstream.count(), 0, "{case}: reached the upstream");
    }
}

/// Each request line on its own connection: refused by the gateway's checks with `status` and an
/// OperationOutcome echoing the request's id, and the upstream never called.
async fn assert_all_refused_by_the_gateway(rig: &Rig, status: u16, request_lines: &[&str]) {
    for line in request_lines {
        let id = new_id();
        let outcome = exchange(rig, &request_bytes_with_id(line, &id, "", b"")).await;
        let Outcome::Answer(answer) = outcome else {
            panic!("{line}: expected {status}, got {outcome:?}")
        };
        assert_eq!(answer.status(), status, "{line}: {}", answer.head);
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some("application/fhir+json"),
            "{line}"
        );
        assert_eq!(
            answer.header("x-request-id").as_deref(),
            Some(id.as_str()),
            "{line}"
        );
        let oo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome", "{line}");
        assert_eq!(rig.upstream.count(), 0, "{line}: reached the upstream");
    }
}

// ---- a raw upstream that records the exact bytes it receives ----------------------------------

/// How [`RawUpstream`] answers each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawReply {
    /// `200` with a two-byte JSON body, keeping the connection.
    Ok,
    /// Reads the request and never writes a byte.
    Silent,
    /// Response headers declaring 1000 bytes, 500 of them, then the connection closed.
    HalfBodyThenClose,
    /// Response headers declaring 1000 bytes, 500 of them, then nothing, connection kept open.
    HalfBodyThenStall,
}

/// A complete 200 answer.
const OK_ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}";
/// The head of a 200 answer declaring a 1000-byte body.
const HEAD_OF_1000: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 1000\r\n\r\n";

/// A legacy receiver stand-in that records every complete request exactly as it crossed the wire.
struct RawUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Message>>>,
    arrived: Arc<Notify>,
}

impl RawUpstream {
    async fn start(reply: RawReply) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (r, a) = (received.clone(), arrived.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, a) = (r.clone(), a.clone());
                tokio::spawn(async move {
                    let mut reader = Reader::new(stream);
                    // Only complete requests are recorded: one cut off mid-body errors out here.
                    while let Ok(Some(request)) = reader.message(false).await {
                        r.lock().unwrap().push(request);
                        a.notify_waiters();
                        let half = format!("{HEAD_OF_1000}{}", "x".repeat(500));
                        match reply {
                            RawReply::Ok => {
                                if reader.io.write_all(OK_ANSWER).await.is_err() {
                                    return;
                                }
                            }
                            RawReply::Silent => std::future::pending::<()>().await,
                            RawReply::HalfBodyThenClose => {
                                let _ = reader.io.write_all(half.as_bytes()).await;
                                return;
                            }
                            RawReply::HalfBodyThenStall => {
                                let _ = reader.io.write_all(half.as_bytes()).await;
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            received,
            arrived,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Message> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for_count(&self, n: usize) {
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.received.lock().unwrap().len() >= n {
                return;
            }
            notified.await;
        }
    }
}

/// A gateway (standard PKI and config) in front of a [`RawUpstream`] (the rig's own counting
/// upstream stays unused).
async fn raw_rig(
    reply: RawReply,
    adjust: impl FnOnce(&mut bars_gateway::config::Settings),
) -> (Rig, RawUpstream) {
    let raw = RawUpstream::start(reply).await;
    let url = bars_gateway::config::UpstreamUrl {
        uri: raw.url().parse().unwrap(),
        authority: raw.addr.to_string(),
        base_path: String::new(),
    };
    let rig = Rig::start_with(|s| {
        s.upstream.url = Some(url);
        adjust(s)
    })
    .await;
    (rig, raw)
}

// ---- HTTP/1.1 framing --------------------------------------------------------------------------

#[tokio::test]
async fn conflicting_or_invalid_content_length_is_refused_and_never_forwarded() {
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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

// ---- resource limits ---------------------------------------------------------------------------

/// The `/metrics` text of the gateway's admin listener.
async fn metrics_text(rig: &Rig) -> String {
    admin_get(rig.gateway.admin.unwrap(), "/metrics").await
}

/// Polls a metric of the rig's gateway until `done` (the one helper in tests/common).
async fn wait_for_metric(rig: &Rig, series: &str, done: impl Fn(f64) -> bool) -> f64 {
    wait_for_metric_of(rig.gateway.admin.unwrap(), series, done).await
}

/// Writes `bytes` one at a time, `gap` apart, until the peer closes; returns how many were written
/// before the close was seen (all of them if it never closed).
async fn trickle(conn: &mut Reader<Tls>, bytes: &[u8], gap: Duration) -> usize {
    for (sent, byte) in bytes.iter().enumerate() {
        if conn.io.write_all(&[*byte]).await.is_err() || conn.io.flush().await.is_err() {
            return sent;
        }
        tokio::select! {
            read = conn.fill() => match read {
                Ok(true) => panic!("the gateway answered a request still being sent: {:?}",
                    String::from_utf8_lossy(&conn.buf)),
                _ => return sent + 1,
            },
            // The slowness under test, not synchronisation.
            _ = tokio::time::sleep(gap) => {}
        }
    }
    bytes.len()
}

#[tokio::test]
async fn a_header_section_sent_one_byte_at_a_time_is_cut_off_at_the_header_read_timeout() {
    let _serial = serial_guard().await;
    let rig = Rig::start_with(|s| s.listen.header_read_timeout = Duration::from_millis(300)).await;
    let mut conn = open(&rig).await;
    let bytes = request_bytes(GET, "", b"");
    // ~1.2 KB at one byte per 50 ms would take a minute.
    let sent = trickle(&mut conn, &bytes, Duration::from_millis(50)).await;
    assert!(
        sent < bytes.len(),
        "the slow header section was never cut off"
    );
    assert!(conn.is_closed().await);
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_slow_second_request_on_a_kept_alive_connection_is_cut_off_too() {
    let _serial = serial_guard().await;
    let rig = Rig::start_with(|s| s.listen.header_read_timeout = Duration::from_millis(300)).await;
    let mut conn = open(&rig).await;
    let first = conn.exchange(&request_bytes(GET, "", b"")).await;
    assert_eq!(first.status(), Some(200), "{first:?}");
    let bytes = request_bytes(GET, "", b"");
    let sent = trickle(&mut conn, &bytes, Duration::from_millis(50)).await;
    assert!(
        sent < bytes.len(),
        "the slow second request was never cut off"
    );
    assert_eq!(
        rig.upstream.count(),
        1,
        "only the first request was forwarded"
    );
}

#[tokio::test]
async fn a_body_that_trickles_slower_than_the_request_timeout_is_refused_and_never_forwarded() {
    let _serial = serial_guard().await;
    let rig = Rig::start_with(|s| s.upstream.request_timeout = Duration::from_millis(400)).await;
    let mut conn = open(&rig).await;
    let id = new_id();
    let head = request_bytes_with_id(POST, &id, "Content-Length: 1000\r\n", b"");
    conn.io.write_all(&head).await.unwrap();
    // The body trickles: one byte per 50 ms, 1000 bytes would take 50 s.
    let body = vec![b'x'; 1000];
    let sent = tokio::time::timeout(SAFETY_NET, async {
        for (sent, byte) in body.iter().enumerate() {
            if conn.io.write_all(&[*byte]).await.is_err() {
                return sent;
            }
            tokio::select! {
                _ = conn.find_filling(b"\r\n\r\n", 0) => return sent + 1,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        body.len()
    })
    .await
    .expect("the gateway gives up on the body");
    assert!(sent < body.len());
    let Outcome::Answer(answer) = conn.answer().await else {
        panic!("expected an answer")
    };
    assert_eq!(answer.status(), 408, "{}", answer.head);
    assert_eq!(answer.header("x-request-id").as_deref(), Some(id.as_str()));
    let oo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        oo["issue"][0]["diagnostics"],
        "The request body was not received in time"
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_stalled_body_on_a_streamed_method_gets_408_and_the_upstream_never_gets_a_complete_request(
) {
    let _serial = serial_guard().await;
    let (rig, upstream) = raw_rig(RawReply::Ok, |s| {
        s.dedup.methods.clear();
        s.upstream.request_timeout = Duration::from_millis(400);
    })
    .await;
    let mut conn = open(&rig).await;
    let outcome = conn
        .exchange(&request_bytes(
            POST,
            "Content-Length: 1000\r\n",
            b"only the start",
        ))
        .await;
    assert_eq!(outcome.status(), Some(408), "{outcome:?}");
    assert!(
        upstream.received().is_empty(),
        "an incomplete body was delivered as complete"
    );
}

#[tokio::test]
async fn a_third_connection_beyond_max_connections_is_closed_at_accept_and_counted() {
    let _serial = serial_guard().await;
    let rig = Rig::start_with(|s| s.listen.max_connections = 2).await;
    let mut first = open(&rig).await;
    let mut second = open(&rig).await;
    // An answer on each proves both hold their slot.
    for conn in [&mut first, &mut second] {
        assert_eq!(
            conn.exchange(&request_bytes(GET, "", b"")).await.status(),
            Some(200)
        );
    }
    let mut third = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(SAFETY_NET, third.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the third connection got bytes: {read:?}"
    );
    assert_eq!(
        metric_of(
            rig.gateway.admin.unwrap(),
            "bars_gateway_rejections_total{reason=\"max_connections\"}"
        )
        .await,
        1.0
    );
    // A slot frees when a connection ends.
    drop(first);
    wait_for_metric(&rig, "bars_gateway_connections_open", |open| open <= 1.0).await;
    let mut fourth = open(&rig).await;
    assert_eq!(
        fourth.exchange(&request_bytes(GET, "", b"")).await.status(),
        Some(200)
    );
    assert_eq!(rig.upstream.count(), 3);
}

#[tokio::test]
async fn a_header_section_over_max_header_bytes_gets_431_and_is_never_forwarded() {
    let _serial = serial_guard().await;
    let rig = Rig::start().await; // listen.max_header_bytes: the default 32 KiB
    let big = format!("X-Note: {}\r\n", "a".repeat(40 * 1024));
    let outcome = exchange(&rig, &request_bytes(GET, &big, b"")).await;
    assert!(matches!(outcome.status(), Some(431) | None), "{outcome:?}");
    assert_eq!(rig.upstream.count(), 0);
    // Many fields each under the limit but together over it.
    let many: String = (0..40)
        .map(|i| format!("X-Note-{i}: {}\r\n", "b".repeat(1000)))
        .collect();
    let outcome = exchange(&rig, &request_bytes(GET, &many, b"")).await;
    assert!(matches!(outcome.status(), Some(431) | None), "{outcome:?}");
    assert_eq!(rig.upstream.count(), 0);
    // Under the limit is served.
    let fine = format!("X-Note: {}\r\n", "a".repeat(20 * 1024));
    assert_eq!(
        exchange(&rig, &request_bytes(GET, &fine, b""))
            .await
            .status(),
        Some(200)
    );
}

#[tokio::test]
async fn more_than_100_header_fields_get_431_and_are_never_forwarded() {
    let _serial = serial_guard().await;
    let rig = Rig::start().await;
    let many: String = (0..100).map(|i| format!("X-Note-{i}: {i}\r\n")).collect();
    let outcome = exchange(&rig, &request_bytes(GET, &many, b"")).await;
    assert!(matches!(outcome.status(), Some(431) | None), "{outcome:?}");
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn bodies_over_max_body_get_413_by_content_length_and_by_chunked_and_are_never_forwarded() {
    let _serial = serial_guard().await;
    for streamed in [false, true] {
        let rig = Rig::start_with(|s| {
            s.upstream.max_body = 1024;
            if streamed {
                s.dedup.methods.clear();
            }
        })
        .await;
        let id = new_id();
        let by_length = request_bytes_with_id(POST, &id, "Content-Length: 2000\r\n", &[b'x'; 2000]);
        let Outcome::Answer(answer) = exchange(&rig, &by_length).await else {
            panic!("expected a 413")
        };
        assert_eq!(answer.status(), 413, "streamed {streamed}: {}", answer.head);
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some("application/fhir+json")
        );
        assert_eq!(answer.header("x-request-id").as_deref(), Some(id.as_str()));
        let oo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(oo["issue"][0]["code"], "too-long");
        assert_eq!(rig.upstream.count(), 0, "streamed {streamed}");

        let mut chunked = Vec::new();
        for _ in 0..4 {
            chunked.extend_from_slice(b"200\r\n");
            chunked.extend_from_slice(&[b'y'; 512]);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let outcome = exchange(
            &rig,
            &request_bytes(POST, "Transfer-Encoding: chunked\r\n", &chunked),
        )
        .await;
        assert_eq!(
            outcome.status(),
            Some(413),
            "streamed {streamed}: {outcome:?}"
        );
        for seen in rig.upstream.seen() {
            assert!(
                seen.body.len() <= 1024,
                "an over-limit body was delivered whole"
            );
        }
        if !streamed {
            assert_eq!(rig.upstream.count(), 0);
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_a_large_response_is_disconnected_after_the_idle_timeout() {
    let _serial = serial_guard().await;
    let rig = Rig::start_with(|s| s.listen.idle_timeout = Duration::from_millis(300)).await;
    // Far more than the loopback socket buffers and TLS buffers can absorb.
    rig.upstream.set_reply(Reply::With(
        http::StatusCode::OK,
        vec![("content-type", "application/fhir+json")],
        Bytes::from(vec![b' '; 32 << 20]),
    ));
    let mut conn = open(&rig).await;
    conn.io
        .write_all(&request_bytes(GET, "", b""))
        .await
        .unwrap();
    rig.upstream.wait_for_count(1).await;
    // The client never reads: once the buffers are full no byte moves, and after an idle timeout
    // (asked to close) and another (still stuck) the gateway lets the connection go.
    wait_for_metric(&rig, "bars_gateway_connections_open", |open| open == 0.0).await;
    drop(conn);
}

#[tokio::test]
async fn an_idle_kept_alive_http1_connection_outlives_the_header_read_timeout_and_closes_when_idle()
{
    let _serial = serial_guard().await;
    // hyper's own header timer also runs while a kept-alive connection waits for its next request;
    // the gateway keeps it as a backstop at idle_timeout, so an idle connection lives for
    // idle_timeout (no handshake per quiet spell) while a started header section still gets only
    // header_read_timeout (the slowloris tests).
    let rig = Rig::start_with(|s| {
        s.listen.header_read_timeout = Duration::from_millis(200);
        s.listen.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut conn = open(&rig).await;
    assert_eq!(
        conn.exchange(&request_bytes(GET, "", b"")).await.status(),
        Some(200)
    );
    // Idle for three header timeouts: that is the behaviour under test, time has to pass.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        conn.exchange(&request_bytes(GET, "", b"")).await.status(),
        Some(200),
        "a kept-alive connection must survive an idle spell shorter than idle_timeout"
    );
    assert!(conn.is_closed().await, "closed once idle for idle_timeout");
    assert_eq!(rig.upstream.count(), 2);
}

// ---- raw h2 ------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// How one h2 stream ended.
#[derive(Debug, PartialEq, Eq)]
enum H2Outcome {
    /// Response headers; the status when the HPACK block names it statically or literally.
    Status(Option<u16>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection ended.
    Closed,
}

impl H2Outcome {
    fn assert_refused(&self, case: &str) {
        match self {
            H2Outcome::Status(Some(status)) if (400..500).contains(status) => {}
            H2Outcome::Reset(_) | H2Outcome::GoAway(_) | H2Outcome::Closed => {}
            other => panic!("{case}: expected a 4xx, a reset or a close, got {other:?}"),
        }
    }
}

/// An h2 client speaking frames by hand (RFC 9113), HPACK literals without indexing or Huffman.
struct H2 {
    conn: Reader<Tls>,
    settings: Vec<(u16, u32)>,
}

impl H2 {
    /// Connects with ALPN h2, exchanges prefaces and acknowledges the server's SETTINGS (from then
    /// on they are in force on the server side too).
    async fn open(rig: &Rig) -> H2 {
        let config = rig.pki.client_config_with(
            Some(ClientCert::Proxy),
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            vec![b"h2".to_vec()],
        );
        let conn = open_with(rig, config).await;
        assert_eq!(conn.io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut h2 = H2 {
            conn,
            settings: Vec::new(),
        };
        h2.conn.io.write_all(PREFACE).await.unwrap();
        h2.send(SETTINGS, 0, 0, &[]).await;
        loop {
            let frame = h2.frame().await.expect("server SETTINGS");
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                h2.settings = frame
                    .payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                break;
            }
        }
        h2.send(SETTINGS, ACK, 0, &[]).await;
        h2
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        let _ = self.conn.io.write_all(&frame).await;
    }

    /// Sends a header block, split into HEADERS + CONTINUATION frames of at most 16 KiB.
    async fn send_headers(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let last = if i + 1 == pieces.len() {
                END_HEADERS
            } else {
                0
            };
            if i == 0 {
                let end = if end_stream { END_STREAM } else { 0 };
                self.send(HEADERS, last | end, stream, piece).await;
            } else {
                self.send(CONTINUATION, last, stream, piece).await;
            }
        }
    }

    /// The next frame; `None` when the connection ends.
    async fn frame(&mut self) -> Option<Frame> {
        let read = async {
            self.conn.fill_to(9).await.ok()?;
            let len = u32::from_be_bytes([0, self.conn.buf[0], self.conn.buf[1], self.conn.buf[2]])
                as usize;
            self.conn.fill_to(9 + len).await.ok()?;
            let header: Vec<u8> = self.conn.buf.drain(..9).collect();
            let payload = self.conn.buf.drain(..len).collect();
            Some(Frame {
                kind: header[3],
                flags: header[4],
                stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                    & 0x7fff_ffff,
                payload,
            })
        };
        tokio::time::timeout(SAFETY_NET, read)
            .await
            .expect("the gateway answers or closes")
    }

    /// Reads until stream `id` gets response headers or a reset, or the connection ends.
    async fn outcome(&mut self, id: u32) -> H2Outcome {
        loop {
            let Some(frame) = self.frame().await else {
                return H2Outcome::Closed;
            };
            let code = || u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
            match frame.kind {
                HEADERS if frame.stream == id => {
                    return H2Outcome::Status(decode_status(&frame.payload))
                }
                RST_STREAM if frame.stream == id => return H2Outcome::Reset(code()),
                GOAWAY => {
                    return H2Outcome::GoAway(u32::from_be_bytes(
                        frame.payload[4..8].try_into().unwrap(),
                    ))
                }
                _ => {}
            }
        }
    }
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 7, value.len());
    out.extend_from_slice(value);
}

/// A header field as raw bytes: name, value.
type Field<'a> = (&'a [u8], &'a [u8]);

/// A request header block: pseudo-headers, the BaRS example headers (fresh id), then `extra`.
fn h2_block(method: &str, path: &str, extra: &[Field]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", method),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
    ] {
        hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
    }
    for (name, value) in example_headers().as_object().unwrap() {
        let value = if name == "X-Request-Id" {
            new_id()
        } else {
            value.as_str().unwrap().to_string()
        };
        hpack_literal(
            &mut block,
            name.to_ascii_lowercase().as_bytes(),
            value.as_bytes(),
        );
    }
    for (name, value) in extra {
        hpack_literal(&mut block, name, value);
    }
    block
}

/// The `:status` at the start of a response header block, when it is a static-table entry or a
/// literal (plain or Huffman-coded digits) with the static `:status` name; `None` otherwise.
fn decode_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    if first & 0x80 != 0 {
        return [200, 204, 206, 304, 400, 404, 500]
            .get(usize::from(first & 0x7f).checked_sub(8)?)
            .copied();
    }
    let name_index = if first & 0xc0 == 0x40 {
        first & 0x3f
    } else if first & 0xe0 == 0x00 {
        first & 0x0f
    } else {
        return None;
    };
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let (huffman, len) = (block[1] & 0x80 != 0, usize::from(block[1] & 0x7f));
    let bytes = block.get(2..2 + len)?;
    let digits = if huffman {
        huffman_digits(bytes)?
    } else {
        String::from_utf8(bytes.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// Decodes a Huffman string made only of digits (RFC 7541 Appendix B: `0`-`2` are 5-bit codes
/// 0-2, `3`-`9` 6-bit codes 0x19-0x1f), then EOS padding.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |v, b| v << 1 | b);
    let (mut pos, mut out) = (0, String::new());
    while pos < bits.len() {
        let rest = bits.len() - pos;
        if rest >= 5 && value(pos, 5) <= 2 {
            out.push(char::from(b'0' + value(pos, 5)));
            pos += 5;
        } else if rest >= 6 && (0x19..=0x1f).contains(&value(pos, 6)) {
            out.push(char::from(b'3' + value(pos, 6) - 0x19));
            pos += 6;
        } else if rest < 8 && bits[pos..].iter().all(|b| *b == 1) {
            break;
        } else {
            return None;
        }
    }
    Some(out)
}

#[tokio::test]
async fn a_well_formed_h2_request_is_served() {
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
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
    let _serial = serial_guard().await;
    let rig = Rig::start().await;
    let mut h2 = H2::open(&rig).await;
    let big = vec![b'a'; 40 * 1024];
    h2.send_headers(1, &h2_block("GET", "/metadata", &[(b"x-note", &big)]), true)
        .await;
    let outcome = h2.outcome(1).await;
    assert_eq!(outcome, H2Outcome::Status(Some(431)), "h2's own answer");
    assert_eq!(rig.upstream.count(), 0);
}

// ---- a flood of refused handshakes -------------------------------------------------------------

/// This process's resident set size (the gateway runs in-process), in KiB.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// One client refused in the handshake: in TLS 1.3 the client may finish first, so the refusal
/// (an alert, or the close) is read after it.
async fn refused_handshake(addr: SocketAddr, config: Arc<rustls::ClientConfig>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connected = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    if let Ok(mut tls) = connected {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(SAFETY_NET, tls.read(&mut buf))
            .await
            .expect("the refusal arrives");
        assert!(matches!(read, Ok(0) | Err(_)), "a refused client got data");
    }
}

/// `n` refused handshakes, 25 at a time, alternating no certificate and an untrusted one.
async fn flood(rig: &Rig, n: usize) {
    let configs = [
        rig.pki.client_config(None),
        rig.pki.client_config(Some(ClientCert::Rogue)),
    ];
    for wave in 0..n.div_ceil(25) {
        let mut set = tokio::task::JoinSet::new();
        for i in wave * 25..((wave + 1) * 25).min(n) {
            set.spawn(refused_handshake(rig.gateway.addr, configs[i % 2].clone()));
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
    }
}

/// Waits until the gateway has counted `failures` refused handshakes and closed every connection
/// (the client may see the alert before the gateway counts it; metrics are polled).
async fn settle(rig: &Rig, failures: f64) {
    let deadline = tokio::time::Instant::now() + SAFETY_NET;
    while handshake_failures(rig).await < failures {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_metric(rig, "bars_gateway_connections_open", |open| open == 0.0).await;
}

/// Every refused handshake counted, whatever the reason.
async fn handshake_failures(rig: &Rig) -> f64 {
    let text = metrics_text(rig).await;
    text.lines()
        .filter(|l| l.starts_with("bars_gateway_tls_handshake_failures_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_refused_handshakes_do_not_grow_memory_without_bound() {
    let _alone = MEMORY_QUIET.write().await;
    let rig = Rig::start().await;
    // Warm up allocator pools and lazily built state, then measure a flood five times as big.
    flood(&rig, 100).await;
    settle(&rig, 100.0).await;
    let before = vm_rss_kib();
    flood(&rig, 500).await;
    settle(&rig, 600.0).await;
    let after = vm_rss_kib();
    println!("VmRSS {before} KiB -> {after} KiB after 500 refused handshakes");
    assert!(
        after.saturating_sub(before) < 50 * 1024,
        "RSS grew by {} KiB",
        after - before
    );
    assert_eq!(
        handshake_failures(&rig).await,
        600.0,
        "every one refused in the handshake"
    );
    assert_eq!(rig.send(metadata()).await.status, 200, "still serving");
    assert_eq!(rig.upstream.count(), 1);
}

// ---- faults ------------------------------------------------------------------------------------

/// A hyper upstream that can be killed (listener and every connection closed at once) and
/// restarted on the same port; records the X-Request-Id of every request it receives.
struct KillableUpstream {
    addr: SocketAddr,
    ids: Arc<Mutex<Vec<String>>>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl KillableUpstream {
    async fn start() -> KillableUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut upstream = KillableUpstream {
            addr: listener.local_addr().unwrap(),
            ids: Arc::default(),
            running: None,
        };
        upstream.serve(listener);
        upstream
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let ids = self.ids.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { break };
                let ids = ids.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let ids = ids.clone();
                            async move {
                                let id = request.headers()["x-request-id"]
                                    .to_str()
                                    .unwrap()
                                    .to_string();
                                let _ = request.into_body().collect().await;
                                ids.lock().unwrap().push(id);
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    Bytes::from_static(b"{}"),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Abort every connection and wait until each is gone: killed means no socket left.
            connections.shutdown().await;
        });
        self.running = Some((stop, task));
    }

    async fn kill(&mut self) {
        let (stop, task) = self.running.take().expect("running");
        let _ = stop.send(());
        task.await.unwrap();
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the port is free again");
        self.serve(listener);
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }
}

/// A `POST /$process-message` (35 KB example body) with the given X-Request-Id.
fn process_message_with_id(id: &str) -> http::Request<Full<Bytes>> {
    let mut request = process_message();
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

/// What the load clients got: (id, status), in arrival order.
#[derive(Default)]
struct Tally {
    results: Mutex<Vec<(String, u16)>>,
    changed: Notify,
}

impl Tally {
    fn count(&self, status: u16) -> usize {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == status)
            .count()
    }

    async fn wait_until(&self, done: impl Fn(&Tally) -> bool) {
        tokio::time::timeout(SAFETY_NET, async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .expect("the load reaches the expected state");
    }
}

#[tokio::test]
async fn upstream_killed_and_restarted_under_load_gets_503s_then_recovers_and_forwards_nothing_twice(
) {
    let _serial = serial_guard().await;
    let pki = TestPki::new();
    let mut upstream = KillableUpstream::start().await;
    let settings = pki.settings(&pki.config_toml(&format!("http://{}", upstream.addr)));
    let gateway = TestGateway::start(settings).await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (tally, stop, addr) = (tally.clone(), stop.clone(), gateway.addr);
        let config = pki.client_config(Some(ClientCert::Proxy));
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = new_id();
                let reply = send(addr, config.clone(), process_message_with_id(&id))
                    .await
                    .unwrap();
                assert_eq!(reply.headers["x-request-id"], id.as_str(), "id echoed");
                assert_eq!(
                    reply.headers["x-correlation-id"],
                    "9562466f-c982-4bd5-bb0e-255e9f5e6689"
                );
                match reply.status.as_u16() {
                    200 => {}
                    503 => reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient"),
                    other => panic!(
                        "unexpected {other}: {}",
                        String::from_utf8_lossy(&reply.body)
                    ),
                }
                tally
                    .results
                    .lock()
                    .unwrap()
                    .push((id, reply.status.as_u16()));
                tally.changed.notify_waiters();
            }
        }));
    }
    tally.wait_until(|t| t.count(200) >= 10).await;
    upstream.kill().await;
    tally.wait_until(|t| t.count(503) >= 5).await;
    upstream.restart().await;
    let served = tally.count(200);
    tally.wait_until(|t| t.count(200) >= served + 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let results = tally.results.lock().unwrap().clone();
    let seen = upstream.ids();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seen.len(),
        "the gateway forwarded a request twice"
    );
    for (id, status) in &results {
        if *status == 200 {
            assert!(
                seen.contains(id),
                "{id} answered 200 but never reached the upstream"
            );
        }
    }
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, s)| *s == 503)
        .map(|(id, _)| id)
        .collect();
    println!(
        "{} requests: {} forwarded, {} got 503",
        results.len(),
        seen.len(),
        failed.len()
    );
    // A 503 is transient: the sender's retry goes through; a retry of a 200 is a duplicate.
    let config = pki.client_config(Some(ClientCert::Proxy));
    for id in failed {
        let retry = send(gateway.addr, config.clone(), process_message_with_id(id))
            .await
            .unwrap();
        assert_eq!(retry.status, 200, "retry of {id} after a 503");
    }
    let (done, _) = results.iter().find(|(_, s)| *s == 200).unwrap();
    let retry = send(gateway.addr, config, process_message_with_id(done))
        .await
        .unwrap();
    retry.assert_outcome(409, "REC_CONFLICT", "duplicate");
}

#[tokio::test]
async fn an_upstream_that_accepts_and_never_answers_gets_408_and_the_retry_425_while_it_may_still_answer(
) {
    let _serial = serial_guard().await;
    let (rig, upstream) = raw_rig(RawReply::Silent, |s| {
        s.upstream.request_timeout = Duration::from_millis(300)
    })
    .await;
    let id = new_id();
    let reply = rig.send(process_message_with_id(&id)).await;
    reply.assert_outcome(408, "REC_TIMEOUT", "timeout");
    assert_eq!(reply.headers["x-request-id"], id.as_str());
    upstream.wait_for_count(1).await;
    // The deadline ended the sender's wait, not the legacy system's work (issue 13).
    let retry = rig.send(process_message_with_id(&id)).await;
    retry.assert_outcome(425, "REC_TOO_EARLY", "duplicate");
    assert_eq!(retry.headers["x-request-id"], id.as_str());
    assert_eq!(
        upstream.received().len(),
        1,
        "a timed-out request may still be processed: its retry is not delivered meanwhile"
    );
}

/// Sends one request and reads the answer as far as it goes: the status, then the whole body or
/// the error that cut it off.
async fn send_and_read_body(
    rig: &Rig,
    request: http::Request<Full<Bytes>>,
) -> (u16, Result<Bytes, String>) {
    let conn = open(rig).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn.io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await;
    (
        status,
        body.map(|b| b.to_bytes()).map_err(|e| e.to_string()),
    )
}

#[tokio::test]
async fn an_upstream_that_resets_mid_body_ends_the_client_response_promptly() {
    let _serial = serial_guard().await;
    let (rig, upstream) = raw_rig(RawReply::HalfBodyThenClose, |s| {
        s.upstream.request_timeout = Duration::from_millis(500)
    })
    .await;
    let id = new_id();
    let (status, body) = tokio::time::timeout(
        SAFETY_NET,
        send_and_read_body(&rig, process_message_with_id(&id)),
    )
    .await
    .expect("the client is not left hanging");
    // The upstream's status line had arrived: the client sees it, then the body breaks off.
    assert_eq!(status, 200);
    assert!(
        body.is_err(),
        "a truncated body must not look complete: {body:?}"
    );
    assert_eq!(upstream.received().len(), 1);
    // A body that broke off is no usable answer: the outcome is uncertain, so the retry is
    // delivered (never lost), marked as a possible duplicate for the legacy system (issue 13).
    wait_for_metric(
        &rig,
        "bars_gateway_dedup_total{outcome=\"uncertain\"}",
        |v| v >= 1.0,
    )
    .await;
    let (status, _) = send_and_read_body(&rig, process_message_with_id(&id)).await;
    assert_eq!(status, 200);
    upstream.wait_for_count(2).await;
    let seen = upstream.received();
    assert_eq!(
        seen[0].headers("x-bars-possible-duplicate"),
        Vec::<String>::new()
    );
    assert_eq!(seen[1].headers("x-bars-possible-duplicate"), ["true"]);
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_the_request_timeout() {
    let _serial = serial_guard().await;
    let (rig, upstream) = raw_rig(RawReply::HalfBodyThenStall, |s| {
        s.upstream.request_timeout = Duration::from_millis(500)
    })
    .await;
    let (status, body) = tokio::time::timeout(SAFETY_NET, send_and_read_body(&rig, metadata()))
        .await
        .expect("the client is not left hanging");
    assert_eq!(status, 200);
    assert!(
        body.is_err(),
        "a truncated body must not look complete: {body:?}"
    );
    assert_eq!(upstream.received().len(), 1);
}

/// Makes `path` unreadable: `chmod 000` where that stops reads; where it does not (root, or
/// CAP_DAC_OVERRIDE), replaces the file with a directory of the same name. Returns which.
fn make_unreadable(path: &std::path::Path) -> &'static str {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(path).is_err() {
        return "chmod 000";
    }
    std::fs::remove_file(path).unwrap();
    std::fs::create_dir(path).unwrap();
    "a directory in place of the file (chmod 000 does not stop this process reading)"
}

#[tokio::test]
async fn an_unreadable_certificate_at_reload_keeps_the_old_material_in_service() {
    let _serial = serial_guard().await;
    let rig = Rig::start().await;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let before = served_certificate(rig.gateway.addr, config.clone()).await;
    let how = make_unreadable(&rig.pki.path("server-chain.pem"));
    println!("unreadable by: {how}");
    let err = rig.gateway.reloader.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("tls.certificate") && err.contains("server-chain.pem"),
        "{how}: {err}"
    );
    assert_eq!(served_certificate(rig.gateway.addr, config).await, before);
    assert_eq!(rig.send(metadata()).await.status, 200);
}
