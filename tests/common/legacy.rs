//! A legacy receiver that misbehaves on purpose: it reads each request off the wire, counts it and
//! answers with exactly the bytes a test scripts (late, reset, broken framing, upgrades, huge
//! heads), so that the gateway's delivery promise is tested against what real legacy systems do.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

/// What the legacy system does with one request, once it has read it whole.
#[derive(Clone)]
pub enum Act {
    /// Writes these bytes and keeps the connection for the next request.
    Answer(Vec<u8>),
    /// Writes these bytes, then closes.
    AnswerThenClose(Vec<u8>),
    /// Waits for a permit of the semaphore, then writes these bytes (the connection is kept).
    Gated(Arc<Semaphore>, Vec<u8>),
    /// Waits this long (a slow legacy system), then writes these bytes.
    Delayed(Duration, Vec<u8>),
    /// Closes without a byte (after the request was read: it may have been processed).
    Close,
    /// Resets the connection (RST) without a byte.
    Reset,
}

/// A request as it crossed the wire to the legacy system.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The request line.
    pub line: String,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl RawRequest {
    /// The value of the first field called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The stub legacy receiver.
pub struct Legacy {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<RawRequest>>>,
    arrived: Arc<Notify>,
    script: Arc<Mutex<VecDeque<Act>>>,
}

impl Legacy {
    /// Starts on a free loopback port; each request takes the next act of the script, and
    /// `Answer(ok_json())` once the script is used up.
    pub async fn start(script: Vec<Act>) -> Legacy {
        Legacy::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), script)
    }

    /// As [`Legacy::start`], on a listener the test bound.
    pub fn start_on(listener: TcpListener, script: Vec<Act>) -> Legacy {
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (r, a, s) = (received.clone(), arrived.clone(), script.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, a, s) = (r.clone(), a.clone(), s.clone());
                tokio::spawn(serve(stream, r, a, s));
            }
        });
        Legacy {
            addr,
            received,
            arrived,
            script,
        }
    }

    /// Appends acts to the script.
    pub fn then(&self, acts: Vec<Act>) {
        self.script.lock().unwrap().extend(acts);
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// As the gateway's `upstream.url`.
    pub fn upstream_url(&self) -> bars_gateway::config::UpstreamUrl {
        bars_gateway::config::UpstreamUrl {
            uri: self.url().parse().unwrap(),
            authority: self.addr.to_string(),
            base_path: String::new(),
        }
    }

    /// How many whole requests reached it.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The requests that reached it.
    pub fn received(&self) -> Vec<RawRequest> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have reached it (woken on each arrival, no polling).
    pub async fn wait_for_count(&self, n: usize) {
        super::wait_until(&self.arrived, || self.count() >= n).await
    }
}

async fn serve(
    mut stream: TcpStream,
    received: Arc<Mutex<Vec<RawRequest>>>,
    arrived: Arc<Notify>,
    script: Arc<Mutex<VecDeque<Act>>>,
) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer).await else {
            return;
        };
        received.lock().unwrap().push(request);
        arrived.notify_waiters();
        let act = script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Act::Answer(ok_json()));
        let keep = match act {
            Act::Answer(bytes) => stream.write_all(&bytes).await.is_ok(),
            Act::AnswerThenClose(bytes) => {
                let _ = stream.write_all(&bytes).await;
                false
            }
            Act::Gated(gate, bytes) => {
                let Ok(_permit) = gate.acquire().await else {
                    return;
                };
                stream.write_all(&bytes).await.is_ok()
            }
            Act::Delayed(delay, bytes) => {
                tokio::time::sleep(delay).await;
                stream.write_all(&bytes).await.is_ok()
            }
            Act::Close => false,
            Act::Reset => {
                // Zero linger: the close sends RST and does not block.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                false
            }
        };
        if !keep {
            return;
        }
    }
}

/// Reads one request (head, then a Content-Length body; the gateway always sends one for a
/// body) from `stream`, keeping any bytes beyond it in `buffer`.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<RawRequest> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let line = lines.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    buffer.drain(..body_start + length);
    Some(RawRequest {
        line,
        headers,
        body,
    })
}

/// A whole HTTP/1.1 answer with a Content-Length.
pub fn answer(status_line: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status_line}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A whole HTTP/1.1 answer with a chunked body, one chunk per slice.
pub fn chunked(status_line: &str, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status_line}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("transfer-encoding: chunked\r\n\r\n");
    let mut out = out.into_bytes();
    for chunk in chunks {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// `200 OK` with a small FHIR JSON body.
pub fn ok_json() -> Vec<u8> {
    answer(
        "200 OK",
        &[("content-type", "application/fhir+json")],
        br#"{"resourceType":"Bundle","type":"message"}"#,
    )
}
