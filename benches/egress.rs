//! Egress overhead: the same BaRS API stand-in (HTTPS on loopback) called two ways in one run,
//! (1) directly, as a sender that did the transport work itself would (pooled HTTPS client, BaRS
//! headers and a Bearer token already made), and (2) through the gateway's egress listener (plain
//! HTTP in; token cached after the warm-up, headers completed, HTTPS out). Prints req/s, mean and
//! p99 latency of each, and their ratio, as one `RESULT` line; with the CPU the whole process (client,
//! stand-in and, on the egress side, the gateway) spent per request in each phase, and its RSS
//! after each: the differences are what the egress path costs.
//!
//! Usage: `cargo bench --bench egress -- --run [--requests N] [--concurrency C] [--body FILE]`.
//! Given only cargo bench's `--bench` flag (a plain `cargo bench`), it prints usage and exits: run
//! it on a quiet machine (BENCHMARKS.md, "Egress overhead").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

const TARGET: &str = "https://fhir.nhs.uk/Id/dos-service-id|2000011147";

mod common;

const API_PATH: &str = "/booking-and-referral/FHIR/R4";
const TOKEN: &str = "bench-token";

fn main() {
    let Some(args) = common::run_args(
        "cargo bench --bench egress -- --run [--requests N] [--concurrency C] [--body FILE]",
    ) else {
        return;
    };
    let requests = common::number(&args, "--requests", 5000);
    let concurrency = common::number(&args, "--concurrency", 8).max(1);
    let body = match common::flag(&args, "--body") {
        Some(path) => Bytes::from(std::fs::read(path).expect("--body file")),
        None => Bytes::from_static(br#"{"resourceType":"Bundle","type":"message"}"#),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(requests, concurrency, body));
}

async fn run(requests: usize, concurrency: usize, body: Bytes) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = bars_gateway::demo::pki::write_demo_pki(dir.path(), "bench-client").expect("pki");
    bars_gateway::keygen::generate("Bench-INT-1", &dir.path().join("keys"), 2048, None)
        .expect("key");
    std::fs::write(dir.path().join("api-key"), "bench-api-key").expect("api key");
    let stub = start_stub(&pki).await;
    let config = format!(
        r#"
[listen]
address = "127.0.0.1:0"
[tls]
certificate = "server-chain.pem"
private_key = "server.key"
client_ca = ["root.pem"]
[client]
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["bench-client"]
[upstream]
url = "http://127.0.0.1:9"
[admin]
address = ""
[log]
level = "error"
audit = false
[egress]
address = "127.0.0.1:0"
environment = "custom"
api_base = "https://localhost:{port}{API_PATH}"
token_url = "https://localhost:{port}/oauth2/token"
ca = ["root.pem"]
key_id = "Bench-INT-1"
signing_key = "keys/Bench-INT-1.key"
api_key_file = "api-key"
ods_code = "A1001"
"#,
        port = stub.port()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("config");
    let settings = bars_gateway::config::load(&path).expect("valid config");
    let gateway = bars_gateway::Gateway::bind(settings)
        .await
        .expect("gateway binds");
    let egress = gateway.egress_addr().expect("egress listener");
    tokio::spawn(gateway.serve(std::future::pending()));

    // Direct: what a sender doing the transport work itself sends (headers made once).
    let direct_client = https_client(&pki);
    let mut direct_headers = HeaderMap::new();
    direct_headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer bench-token"),
    );
    direct_headers.insert(
        "content-type",
        HeaderValue::from_static("application/fhir+json; version=1.1.0"),
    );
    direct_headers.insert(
        "accept",
        HeaderValue::from_static("application/fhir+json; version=1.1.0"),
    );
    direct_headers.insert(
        "nhsd-target-identifier",
        HeaderValue::from_static("eyJzeXN0ZW0iOiJodHRwczovL2ZoaXIubmhzLnVrL0lkL2Rvcy1zZXJ2aWNlLWlkIiwidmFsdWUiOiIyMDAwMDExMTQ3In0="),
    );
    let direct_uri: http::Uri = format!(
        "https://localhost:{}{API_PATH}/$process-message",
        stub.port()
    )
    .parse()
    .expect("uri");
    let mut plain = HttpConnector::new();
    plain.set_nodelay(true);
    let egress_client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(plain);
    let egress_uri: http::Uri = format!("http://{egress}/$process-message")
        .parse()
        .expect("uri");

    let direct = {
        let client = direct_client.clone();
        let (uri, headers, body) = (direct_uri.clone(), direct_headers.clone(), body.clone());
        move || {
            let mut r = Request::post(uri.clone())
                .body(Full::new(body.clone()))
                .expect("request");
            *r.headers_mut() = headers.clone();
            let id = uuid::Uuid::new_v4().to_string();
            for name in ["x-request-id", "x-correlation-id"] {
                r.headers_mut()
                    .insert(name, HeaderValue::from_str(&id).expect("uuid"));
            }
            let client = client.clone();
            async move { client.request(r).await.map(|r| r.status().as_u16()) }
        }
    };
    let through_egress = {
        let client = egress_client.clone();
        let (uri, body) = (egress_uri.clone(), body.clone());
        move || {
            let r = Request::post(uri.clone())
                .header("x-bars-target", TARGET)
                .body(Full::new(body.clone()))
                .expect("request");
            let client = client.clone();
            async move { client.request(r).await.map(|r| r.status().as_u16()) }
        }
    };
    // Warm-up: pools filled, the egress token fetched and cached.
    let _ = measure(direct.clone(), concurrency * 4, concurrency).await;
    let _ = measure(through_egress.clone(), concurrency * 4, concurrency).await;
    let d = measure(direct, requests, concurrency).await;
    let rss_direct_kb = common::self_rss_kb();
    let e = measure(through_egress, requests, concurrency).await;
    let rss_egress_kb = common::self_rss_kb();
    println!(
        "RESULT requests={requests} concurrency={concurrency} body_bytes={} direct_rps={:.0} egress_rps={:.0} rps_ratio={:.2} direct_mean_ms={:.3} egress_mean_ms={:.3} direct_p99_ms={:.3} egress_p99_ms={:.3} latency_ratio={:.2} direct_cpu_us_per_req={:.1} egress_cpu_us_per_req={:.1} cpu_added_us_per_req={:.1} rss_after_direct_kb={rss_direct_kb} rss_after_egress_kb={rss_egress_kb} rss_added_kb={} errors={}",
        body.len(),
        d.rps,
        e.rps,
        e.rps / d.rps,
        d.mean_ms,
        e.mean_ms,
        d.p99_ms,
        e.p99_ms,
        e.mean_ms / d.mean_ms,
        d.cpu_us_per_req,
        e.cpu_us_per_req,
        e.cpu_us_per_req - d.cpu_us_per_req,
        rss_egress_kb.saturating_sub(rss_direct_kb),
        d.errors + e.errors
    );
}

struct Measured {
    rps: f64,
    mean_ms: f64,
    p99_ms: f64,
    /// CPU of the whole process over the phase, per request.
    cpu_us_per_req: f64,
    errors: usize,
}

async fn measure<F, Fut, E>(make: F, requests: usize, concurrency: usize) -> Measured
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<u16, E>> + Send,
{
    let per_worker = requests.div_ceil(concurrency);
    let cpu_before = common::self_cpu_seconds();
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_worker);
                let mut errors = 0;
                for _ in 0..per_worker {
                    let t = Instant::now();
                    match make().await {
                        Ok(200) => latencies.push(t.elapsed()),
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all: Vec<Duration> = Vec::with_capacity(requests);
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.expect("worker");
        all.extend(l);
        errors += e;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = common::self_cpu_seconds() - cpu_before;
    all.sort();
    let mean = all.iter().map(Duration::as_secs_f64).sum::<f64>() / all.len().max(1) as f64;
    let p99 = all
        .get(all.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default();
    Measured {
        rps: all.len() as f64 / wall,
        mean_ms: mean * 1000.0,
        p99_ms: p99.as_secs_f64() * 1000.0,
        cpu_us_per_req: cpu * 1e6 / all.len().max(1) as f64,
        errors,
    }
}

fn https_client(
    pki: &bars_gateway::demo::pki::DemoPki,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.root).expect("root"))
        .expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_root_certificates(roots)
    .with_no_client_auth();
    // TCP_NODELAY as the gateway's own client sets it: without it Nagle and delayed ACKs add
    // ~40 ms stalls to the direct side and the ratio measures the kernel, not the gateway.
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The BaRS API stand-in: `/oauth2/token` issues a fixed token; every other path answers 200 with
/// the ids echoed and a small Bundle.
async fn start_stub(pki: &bars_gateway::demo::pki::DemoPki) -> SocketAddr {
    let chain = CertificateDer::pem_file_iter(&pki.server_chain)
        .expect("chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("cert");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service_fn(answer))
                    .await;
            });
        }
    });
    addr
}

async fn answer(
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let _ = body.collect().await;
    let reply = if parts.uri.path() == "/oauth2/token" {
        format!(r#"{{"access_token":"{TOKEN}","expires_in":"599","token_type":"Bearer"}}"#)
    } else {
        r#"{"resourceType":"Bundle","type":"message"}"#.to_string()
    };
    let mut response = Response::new(Full::new(Bytes::from(reply)));
    for name in ["x-request-id", "x-correlation-id"] {
        if let Some(v) = parts.headers.get(name) {
            response.headers_mut().insert(name, v.clone());
        }
    }
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/fhir+json"),
    );
    Ok(response)
}
