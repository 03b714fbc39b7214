//! The sample legacy receiver of the demo: plain HTTP on loopback, answering the BaRS receiver
//! endpoints with the published example payloads, the way a trust's existing system would sit
//! behind the gateway. It counts what it receives and prints one line per request, showing the
//! headers the gateway added (DESIGN.md §4).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::bars::errors::Refusal;

const CAPABILITY_STATEMENT: &[u8] =
    include_bytes!("../../tests/fixtures/bars-examples/capability-statement.json");
const MESSAGE_DEFINITION: &[u8] = include_bytes!(
    "../../tests/fixtures/bars-examples/message-definition-servicerequest-casetransfer.json"
);
const SLOT_SEARCHSET: &[u8] =
    include_bytes!("../../tests/fixtures/bars-examples/slot-searchset.json");
const PROCESS_MESSAGE_RESPONSE: &[u8] =
    include_bytes!("../../tests/fixtures/bars-examples/process-message-booking-response.json");

/// Bodies larger than this are not read (the gateway's own default limit is 10 MiB).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A running sample receiver; stops accepting when dropped.
pub struct SampleReceiver {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SampleReceiver {
    /// Binds `127.0.0.1:0` and starts serving. Must run inside a Tokio runtime.
    pub async fn start() -> std::io::Result<SampleReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Typically EMFILE: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, counter.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(SampleReceiver {
            addr,
            received,
            task,
        })
    }

    /// `http://127.0.0.1:<port>`, the gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests reached it so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for SampleReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    received: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body_len = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes().len(),
        Err(_) => 0,
    };
    let n = received.fetch_add(1, Ordering::SeqCst) + 1;
    println!(
        "  legacy receiver #{n}: {} {} ({body_len} bytes) X-Request-Id={} X-BaRS-Target={} X-BaRS-Ods-Code={} X-Client-Cert-Subject=\"{}\"",
        parts.method,
        parts.uri,
        shown(&parts.headers, "x-request-id"),
        shown(&parts.headers, "x-bars-target"),
        shown(&parts.headers, "x-bars-ods-code"),
        shown(&parts.headers, "x-client-cert-subject"),
    );
    let path = parts.uri.path();
    let (status, body) = match (&parts.method, path) {
        (&Method::GET, "/metadata") => (StatusCode::OK, Bytes::from_static(CAPABILITY_STATEMENT)),
        (&Method::GET, "/MessageDefinition") => {
            (StatusCode::OK, Bytes::from_static(MESSAGE_DEFINITION))
        }
        (&Method::GET, "/Slot") => (StatusCode::OK, Bytes::from_static(SLOT_SEARCHSET)),
        (&Method::POST, "/$process-message") => {
            (StatusCode::OK, Bytes::from_static(PROCESS_MESSAGE_RESPONSE))
        }
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from(Refusal::NotFound.to_operation_outcome().to_string()),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    // A BaRS receiver echoes both ids on every response (the gateway would add them anyway).
    for name in ["x-request-id", "x-correlation-id"] {
        if let Some(value) = parts.headers.get(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Ok(response)
}

fn shown(headers: &HeaderMap, name: &str) -> String {
    match headers.get(name).map(|v| v.to_str()) {
        Some(Ok(text)) => text.to_string(),
        Some(Err(_)) => "(not text)".to_string(),
        None => "-".to_string(),
    }
}
