//! Criterion microbenchmarks of the per-request work bars-gateway adds in front of the legacy
//! receiver: route, ids, identity headers (the full example set, decoded and validated), Accept,
//! the dedup fingerprint of the 35 KB example body, and a claim in the memory dedup store.
//!
//! The `tls` group measures one full TLS 1.3 mutual-auth handshake in memory (no sockets) with
//! the gateway's own `ServerConfig` (`bars_gateway::tls::load`, the ring provider) and RSA-2048
//! keys made by `openssl` (skipped when `openssl` is missing): the server's share of the CPU, the
//! client's share, and the RSA-PSS signature alone, the costliest step on the server.
//!
//! `cargo bench --bench hot_paths` (benches/run.sh runs it with shorter times).

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bars_gateway::bars::accept::check_accept;
use bars_gateway::bars::identity::{decode_identity_headers, IdentityRequirements};
use bars_gateway::bars::ids::{read_request_ids, RequestId};
use bars_gateway::bars::routes::RouteTable;
use bars_gateway::dedup::memory::MemoryStore;
use bars_gateway::dedup::Fingerprint;
use bars_gateway::metrics::Metrics;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

const HEADERS_EXAMPLES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/bars-examples/headers-examples.json"
));
const BODY: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/bars-examples/process-message-validation-request.json"
));

/// Every header of the example's valid `$process-message` request.
fn example_headers() -> HeaderMap {
    let json: serde_json::Value =
        serde_json::from_str(HEADERS_EXAMPLES).expect("headers-examples.json is JSON");
    let mut headers = HeaderMap::new();
    for (name, value) in json["valid_process_message_request"]["headers"]
        .as_object()
        .expect("the example has a header object")
    {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            HeaderValue::from_str(value.as_str().expect("a string value"))
                .expect("a valid header value"),
        );
    }
    headers
}

/// `n` copies of `headers` whose four identity values each carry the copy's number.
fn distinct_senders(headers: &HeaderMap, n: usize) -> Vec<HeaderMap> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let values = [
        ("nhsd-target-identifier", "2000011147"),
        ("nhsd-end-user-organisation", "A1001"),
        ("nhsd-requesting-software", "SUPP-APP-1"),
        ("nhsd-requesting-practitioner", "100334993514"),
    ];
    (0..n)
        .map(|i| {
            let mut copy = headers.clone();
            for (name, value) in values {
                let json = b64
                    .decode(headers[name].as_bytes())
                    .expect("the example is Base64");
                let json = String::from_utf8(json).expect("the example is UTF-8");
                let changed = json.replacen(value, &format!("{value}{i}"), 1);
                assert_ne!(changed, json, "{name} holds {value}");
                copy.insert(
                    name,
                    HeaderValue::from_str(&b64.encode(changed)).expect("Base64 is a valid value"),
                );
            }
            copy
        })
        .collect()
}

const ALL_REQUIRED: IdentityRequirements = IdentityRequirements {
    target: true,
    organisation: true,
    software: true,
};

fn request_checks(c: &mut Criterion) {
    let headers = example_headers();
    let routes = RouteTable::new("", true, Vec::new());
    let process_message = Uri::from_static("/$process-message");
    let metadata = Uri::from_static("/metadata");

    c.bench_function("route resolve POST /$process-message", |b| {
        b.iter(|| {
            routes.resolve(
                black_box(&Method::POST),
                black_box(&process_message),
                Version::HTTP_11,
            )
        })
    });
    c.bench_function("route resolve GET /metadata", |b| {
        b.iter(|| {
            routes.resolve(
                black_box(&Method::GET),
                black_box(&metadata),
                Version::HTTP_11,
            )
        })
    });
    c.bench_function("ids X-Request-Id + X-Correlation-Id", |b| {
        b.iter(|| read_request_ids(black_box(&headers)))
    });
    c.bench_function("identity headers decode+validate (4 NHSD-*)", |b| {
        b.iter(|| decode_identity_headers(black_box(&headers), ALL_REQUIRED))
    });
    // The gateway memoises valid values per thread (a sender repeats them), so the loop above
    // measures a memo hit; this one cycles through 1,024 senders whose four values all differ,
    // far more than the memo's slots: the full decode, as for a first request.
    let senders = distinct_senders(&headers, 1024);
    let mut next = 0;
    c.bench_function(
        "identity headers decode+validate (4 NHSD-*), memo miss",
        |b| {
            b.iter(|| {
                next = (next + 1) % senders.len();
                decode_identity_headers(black_box(&senders[next]), ALL_REQUIRED)
            })
        },
    );
    c.bench_function("accept check", |b| {
        b.iter(|| check_accept(black_box(&headers), &[1]))
    });
    c.bench_function("all request checks (route+ids+identity+accept)", |b| {
        b.iter(|| {
            let route =
                routes.resolve(&Method::POST, black_box(&process_message), Version::HTTP_11);
            let ids = read_request_ids(black_box(&headers));
            let identity = decode_identity_headers(black_box(&headers), ALL_REQUIRED);
            let accept = check_accept(black_box(&headers), &[1]);
            (route.is_ok(), ids.is_ok(), identity.is_ok(), accept.is_ok())
        })
    });
}

fn dedup(c: &mut Criterion) {
    let headers = example_headers();
    let uri = Uri::from_static("/$process-message");
    let mut group = c.benchmark_group("fingerprint");
    group.throughput(Throughput::Bytes(BODY.len() as u64));
    group.bench_function("sha256 of method+path+headers+35KB body", |b| {
        b.iter(|| Fingerprint::of(&Method::POST, black_box(&uri), &headers, black_box(BODY)))
    });
    group.finish();

    let (metrics, _registry) = Metrics::new();
    let store = MemoryStore::new(
        1_000_000,
        Duration::from_secs(24 * 3600),
        Duration::from_secs(40),
        Arc::new(metrics),
    );
    let mut next: u128 = 0;
    c.bench_function("memory store claim (new id)", |b| {
        b.iter(|| {
            next += 1;
            let id = RequestId(uuid::Uuid::from_u128(next));
            black_box(store.claim(id, Fingerprint([7; 32])))
        })
    });
}

/// Writes an RSA-2048 CA, server (localhost) and client (the proxy's CN) with the openssl CLI.
fn openssl_pki(dir: &Path) -> bool {
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 -keyout ca.key -out ca.pem -subj "/CN=Bench CA" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
for n in server client; do
  if [ $n = server ]; then subj=/CN=localhost; ext="extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost"; else subj="/O=nhs/OU=Devices/CN=bars-proxy.spineservices.nhs.uk"; ext="extendedKeyUsage=clientAuth"; fi
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout $n.key -out $n.csr -subj "$subj"
  printf "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n$ext\n" > $n.ext
  openssl x509 -req -sha256 -days 2 -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -extfile $n.ext -out $n.pem
done"#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Moves every pending TLS record from one side to the other; the time the server spends is
/// added to `server_time`.
fn pump(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
    server_time: &mut Duration,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    while client.wants_write() {
        client.write_tls(&mut buf).expect("client writes");
    }
    let started = Instant::now();
    let mut slice = &buf[..];
    while !slice.is_empty() {
        server.read_tls(&mut slice).expect("server reads");
        server
            .process_new_packets()
            .expect("server accepts the client");
    }
    buf.clear();
    while server.wants_write() {
        server.write_tls(&mut buf).expect("server writes");
    }
    *server_time += started.elapsed();
    let mut slice = &buf[..];
    while !slice.is_empty() {
        client.read_tls(&mut slice).expect("client reads");
        client
            .process_new_packets()
            .expect("client accepts the server");
    }
}

fn tls(c: &mut Criterion) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    if !openssl_pki(dir.path()) {
        eprintln!("tls benches skipped: openssl could not make the PKI");
        return;
    }
    let config = r#"
[listen]
address = "127.0.0.1:0"
[tls]
certificate = "server.pem"
private_key = "server.key"
client_ca = ["ca.pem"]
[client]
environment = "custom"
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["bars-proxy.spineservices.nhs.uk"]
[upstream]
url = "http://127.0.0.1:8080"
"#;
    let settings = bars_gateway::config::parse(config, &dir.path().join("config.toml"))
        .expect("a valid bench config");
    let loaded = bars_gateway::tls::load(&settings.tls, &settings.client).expect("the PKI loads");
    let server_config = loaded.server_config.clone();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.path().join("ca.pem")).expect("ca.pem"))
        .expect("a trust anchor");
    let chain =
        vec![CertificateDer::from_pem_file(dir.path().join("client.pem")).expect("client.pem")];
    let key = PrivateKeyDer::from_pem_file(dir.path().join("client.key")).expect("client.key");
    let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    client_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);
    let name = ServerName::try_from("localhost").expect("a name");

    let mut group = c.benchmark_group("tls");
    group.sample_size(20);
    group.bench_function("full TLS 1.3 mTLS handshake, server side (ring)", |b| {
        b.iter_custom(|iters| {
            let mut server_time = Duration::ZERO;
            for _ in 0..iters {
                let mut client = rustls::ClientConnection::new(client_config.clone(), name.clone())
                    .expect("client");
                let started = Instant::now();
                let mut server =
                    rustls::ServerConnection::new(server_config.clone()).expect("server");
                server_time += started.elapsed();
                while client.is_handshaking() || server.is_handshaking() {
                    pump(&mut client, &mut server, &mut server_time);
                }
                // The gateway reads the verified identity once per connection.
                let started = Instant::now();
                black_box(bars_gateway::tls::client_identity(&server));
                server_time += started.elapsed();
            }
            server_time
        })
    });
    group.bench_function("full TLS 1.3 mTLS handshake, both sides (ring)", |b| {
        b.iter(|| {
            let mut client =
                rustls::ClientConnection::new(client_config.clone(), name.clone()).expect("client");
            let mut server = rustls::ServerConnection::new(server_config.clone()).expect("server");
            let mut ignored = Duration::ZERO;
            while client.is_handshaking() || server.is_handshaking() {
                pump(&mut client, &mut server, &mut ignored);
            }
        })
    });
    // Parsed twice per handshake: by the identity policy (verifier) and for the identity.
    let client_leaf =
        CertificateDer::from_pem_file(dir.path().join("client.pem")).expect("client.pem");
    group.bench_function(
        "client leaf X.509 parse + SHA-256/SHA-1 (CertSummary)",
        |b| b.iter(|| bars_gateway::tls::inspect::CertSummary::from_der(black_box(&client_leaf))),
    );
    let server_key =
        PrivateKeyDer::from_pem_file(dir.path().join("server.key")).expect("server.key");
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&server_key).expect("an RSA key");
    let signer = signing_key
        .choose_scheme(&[rustls::SignatureScheme::RSA_PSS_SHA256])
        .expect("RSA-PSS");
    let message = [0x20u8; 130];
    group.bench_function("RSA-2048 PSS-SHA256 sign (ring)", |b| {
        b.iter(|| signer.sign(black_box(&message)).expect("a signature"))
    });
    group.finish();
}

criterion_group!(benches, request_checks, dedup, tls);
criterion_main!(benches);
