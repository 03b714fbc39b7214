//! Raw HTTP/1.1 on a real TLS-MA stream: hand-made request bytes, a [`Reader`] that frames
//! messages off the wire byte for byte, and [`RawUpstream`], a legacy receiver stand-in that
//! records the exact bytes it gets, so no client framing oddity can hide behind a lenient HTTP
//! parser on either side. Used by the framing, slow-peer, limit, h2 and fault tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::{example_headers, ClientCert, Rig};

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Safety net only: every outcome here arrives at once or after a short configured timeout, so
/// this never elapses in a passing run.
pub const SAFETY_NET: Duration = Duration::from_secs(10);

// ---- raw HTTP/1.1 on the wire -----------------------------------------------------------------

/// A TLS-MA connection with the BaRS proxy's certificate (ALPN `http/1.1`).
pub async fn open(rig: &Rig) -> Reader<Tls> {
    open_with(rig, rig.pki.client_config(Some(ClientCert::Proxy))).await
}

pub async fn open_with(rig: &Rig, config: Arc<rustls::ClientConfig>) -> Reader<Tls> {
    let tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS-MA handshake");
    Reader::new(tls)
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The BaRS example header set with a fresh X-Request-Id, as CRLF-terminated lines.
pub fn bars_lines(id: &str) -> String {
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
pub fn request_bytes(request_line: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    request_bytes_with_id(request_line, &new_id(), extra, body)
}

pub fn request_bytes_with_id(request_line: &str, id: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "{request_line}\r\nHost: localhost\r\n{}{extra}\r\n",
        bars_lines(id)
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub const POST: &str = "POST /$process-message HTTP/1.1";
pub const GET: &str = "GET /metadata HTTP/1.1";

/// One HTTP/1.1 message as it crossed the wire.
#[derive(Debug, Clone)]
pub struct Message {
    pub head: String,
    pub body: Vec<u8>,
    pub raw: Vec<u8>,
}

impl Message {
    /// The status of a response.
    pub fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {}", self.head))
    }

    /// The header lines exactly as sent (after the start line).
    pub fn header_lines(&self) -> Vec<&str> {
        self.head.split("\r\n").skip(1).collect()
    }

    /// Every value of a header (name compared case-insensitively).
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.header_lines()
            .into_iter()
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }
}

/// Reads HTTP/1.1 messages off a byte stream, keeping what it read ahead.
pub struct Reader<S> {
    pub io: S,
    pub buf: Vec<u8>,
}

pub fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<S> {
    pub fn new(io: S) -> Self {
        Reader {
            io,
            buf: Vec::new(),
        }
    }

    /// Reads more; false at EOF.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    pub async fn fill_to(&mut self, len: usize) -> std::io::Result<()> {
        while self.buf.len() < len {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    pub async fn find_filling(&mut self, needle: &[u8], from: usize) -> std::io::Result<usize> {
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
    pub async fn message(&mut self, response: bool) -> std::io::Result<Option<Message>> {
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
pub enum Outcome {
    /// A response.
    Answer(Message),
    /// The connection ended (EOF, reset, or TLS closed without close_notify) before any response;
    /// why, for assertion messages.
    Closed(#[allow(dead_code)] String),
}

impl Outcome {
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answer(m) => Some(m.status()),
            Outcome::Closed(_) => None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<S> {
    /// Writes `bytes` (a write error just means the gateway already closed) and reads one answer.
    pub async fn exchange(&mut self, bytes: &[u8]) -> Outcome {
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
        self.answer().await
    }

    pub async fn answer(&mut self) -> Outcome {
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
    pub async fn is_closed(&mut self) -> bool {
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
pub async fn exchange(rig: &Rig, bytes: &[u8]) -> Outcome {
    open(rig).await.exchange(bytes).await
}

/// Asserts `outcome` is a refusal: a 4xx, or the connection closed without an answer.
pub fn assert_refused(outcome: &Outcome, case: &str) {
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
pub async fn assert_all_refused(rig: &Rig, status: u16, cases: &[(&str, Vec<u8>)]) {
    for (case, bytes) in cases {
        let outcome = exchange(rig, bytes).await;
        assert_refused(&outcome, case);
        assert_eq!(outcome.status(), Some(status), "{case}: {outcome:?}");
        assert_eq!(rig.upstream.count(), 0, "{case}: reached the upstream");
    }
}

/// Each request line on its own connection: refused by the gateway's checks with `status` and an
/// OperationOutcome echoing the request's id, and the upstream never called.
pub async fn assert_all_refused_by_the_gateway(rig: &Rig, status: u16, request_lines: &[&str]) {
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
pub enum RawReply {
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
pub const OK_ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}";
/// The head of a 200 answer declaring a 1000-byte body.
pub const HEAD_OF_1000: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 1000\r\n\r\n";

/// A legacy receiver stand-in that records every complete request exactly as it crossed the wire.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Message>>>,
    pub arrived: Arc<Notify>,
}

impl RawUpstream {
    pub async fn start(reply: RawReply) -> RawUpstream {
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

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Message> {
        self.received.lock().unwrap().clone()
    }

    pub async fn wait_for_count(&self, n: usize) {
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
pub async fn raw_rig(
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
