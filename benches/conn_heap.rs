//! What one idle TLS connection costs the gateway, by allocation: the heap bytes still live on the
//! gateway's connection threads (`bars-shard-*`) once N connections have each made one
//! `GET /metadata` (ids, Accept, the example's NHSD-* headers) and gone idle, grouped by size.
//! RSS (what `benches/run.sh` reports) counts the pages these allocations touched; this says what
//! they are. `--trace SIZE` prints where allocations of that size are made (the first few).
//!
//! Usage: `cargo bench --bench conn_heap -- --run [--connections N] [--trace SIZE]`. Given only
//! cargo bench's `--bench` flag (a plain `cargo bench`), it prints usage and exits.
//!
//! The counting allocator wraps the system allocator and records each allocation made on a shard
//! thread in a fixed open-addressing table (pointer → size), removed when freed on any thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

mod common;

const SLOTS: usize = 1 << 22;
static KEYS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// 0: not counting; 1: counting new allocations; 2: frozen (frees still recorded).
static PHASE: AtomicUsize = AtomicUsize::new(0);
static TRACE_SIZE: AtomicUsize = AtomicUsize::new(0);
static TRACED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// 0: not known yet; 1: a gateway connection thread; 2: any other thread (or busy).
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

fn on_shard_thread() -> bool {
    THREAD_KIND.with(|kind| match kind.get() {
        0 => {
            // Finding the name may allocate: count nothing meanwhile.
            kind.set(2);
            let shard = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("bars-shard"));
            kind.set(if shard { 1 } else { 2 });
            shard
        }
        k => k == 1,
    })
}

fn slot_of(ptr: usize) -> usize {
    (ptr >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 22)
}

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping only reads
// the pointer's value and the layout's size.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if ptr.is_null() || PHASE.load(Ordering::Relaxed) != 1 || !on_shard_thread() {
            return ptr;
        }
        if layout.size() == TRACE_SIZE.load(Ordering::Relaxed)
            && TRACED.fetch_add(1, Ordering::Relaxed) < 4
        {
            THREAD_KIND.with(|k| k.set(2));
            let trace = std::backtrace::Backtrace::force_capture().to_string();
            let frames: Vec<&str> = trace
                .lines()
                .filter(|l| !l.trim_start().starts_with("at "))
                .take(30)
                .collect();
            eprintln!(
                "--- {} bytes allocated at:\n{}",
                layout.size(),
                frames.join("\n")
            );
            THREAD_KIND.with(|k| k.set(1));
        }
        let mut slot = slot_of(ptr as usize);
        for _ in 0..SLOTS {
            if KEYS[slot]
                .compare_exchange(0, ptr as usize, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                SIZES[slot].store(layout.size(), Ordering::Release);
                LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
                LIVE_COUNT.fetch_add(1, Ordering::Relaxed);
                break;
            }
            slot = (slot + 1) & (SLOTS - 1);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if PHASE.load(Ordering::Relaxed) != 0 {
            let mut slot = slot_of(ptr as usize);
            for _ in 0..256 {
                if KEYS[slot].load(Ordering::Acquire) == ptr as usize {
                    let size = SIZES[slot].swap(0, Ordering::AcqRel);
                    KEYS[slot].store(0, Ordering::Release);
                    LIVE_BYTES.fetch_sub(size, Ordering::Relaxed);
                    LIVE_COUNT.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                slot = (slot + 1) & (SLOTS - 1);
            }
        }
        // SAFETY: a pointer this allocator returned, with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let Some(args) =
        common::run_args("cargo bench --bench conn_heap -- --run [--connections N] [--trace SIZE]")
    else {
        return;
    };
    let connections = common::number(&args, "--connections", 500).max(1);
    TRACE_SIZE.store(common::number(&args, "--trace", 0), Ordering::Relaxed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(connections));
}

async fn run(connections: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = bars_gateway::demo::pki::write_demo_pki(dir.path(), "bench-client").expect("pki");
    let backend = start_backend().await;
    let config = format!(
        r#"
[listen]
address = "127.0.0.1:0"
[tls]
certificate = "server-chain.pem"
private_key = "server.key"
client_ca = ["root.pem", "sub-ca.pem"]
[client]
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["bench-client"]
[upstream]
url = "http://{backend}"
[admin]
address = ""
[log]
level = "error"
audit = false
"#
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("config");
    let settings = bars_gateway::config::load(&path).expect("valid config");
    let gateway = bars_gateway::Gateway::bind(settings)
        .await
        .expect("gateway binds");
    let addr = gateway.local_addr();
    tokio::spawn(gateway.serve(std::future::pending()));
    let client = client_config(&pki);

    // One connection first, so that what every connection shares (pools, caches) exists.
    let warm = connect(addr, &client).await;
    let mut held = vec![warm];
    tokio::time::sleep(Duration::from_millis(200)).await;
    PHASE.store(1, Ordering::Relaxed);
    for _ in 0..connections {
        held.push(connect(addr, &client).await);
    }
    // Let the connection tasks settle (responses written, request state dropped).
    tokio::time::sleep(Duration::from_millis(500)).await;
    PHASE.store(2, Ordering::Relaxed);
    let bytes = LIVE_BYTES.load(Ordering::Relaxed);
    let count = LIVE_COUNT.load(Ordering::Relaxed);
    let mut by_size = BTreeMap::<usize, usize>::new();
    for (key, size) in KEYS.iter().zip(SIZES.iter()) {
        if key.load(Ordering::Relaxed) != 0 {
            *by_size.entry(size.load(Ordering::Relaxed)).or_default() += 1;
        }
    }
    let mut sizes: Vec<(usize, usize)> = by_size.into_iter().collect();
    sizes.sort_by_key(|(size, n)| std::cmp::Reverse(size * n));
    let n = connections as f64;
    println!(
        "RESULT connections={connections} heap_bytes_per_conn={:.0} allocations_per_conn={:.1}",
        bytes as f64 / n,
        count as f64 / n
    );
    for (size, count) in sizes.iter().take(16) {
        println!(
            "SIZE bytes={size} per_conn={:.2} bytes_per_conn={:.0}",
            *count as f64 / n,
            (size * count) as f64 / n
        );
    }
    drop(held);
}

/// A kept-alive connection that has made one request, then idles.
async fn connect(
    addr: std::net::SocketAddr,
    client: &std::sync::Arc<rustls::ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http");
    tokio::spawn(conn);
    let id = uuid::Uuid::new_v4().to_string();
    let mut request = Request::get("/metadata")
        .header("host", "localhost")
        .header("x-request-id", &id)
        .header("x-correlation-id", &id)
        .header("accept", "application/fhir+json; version=1.1.0");
    for (name, value) in example_headers() {
        request = request.header(name, value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("answer");
    assert_eq!(response.status(), 200, "the gateway answers the request");
    let _ = response.into_body().collect().await;
    sender
}

/// The NHSD-* headers of the BaRS example (tests/fixtures/bars-examples/headers-examples.json).
fn example_headers() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bars-examples/headers-examples.json"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("headers example")).expect("json");
    json["valid_process_message_request"]["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .filter(|(name, _)| name.to_ascii_lowercase().starts_with("nhsd-"))
        .filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_string())))
        .collect()
}

fn client_config(pki: &bars_gateway::demo::pki::DemoPki) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.root).expect("root"))
        .expect("root");
    let chain = CertificateDer::pem_file_iter(&pki.client_cert)
        .expect("client chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("client chain");
    let key = PrivateKeyDer::from_pem_file(&pki.client_key).expect("client key");
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client cert");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

/// The legacy receiver: 200 with a small FHIR JSON body.
async fn start_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(answer))
                    .await;
            });
        }
    });
    addr
}

async fn answer(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":"4.0.1","format":["application/fhir+json"]}"#,
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/fhir+json"),
    );
    Ok(response)
}
