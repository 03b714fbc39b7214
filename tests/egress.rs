//! Egress end to end: the legacy system sends plain HTTP to the gateway's egress listener; the
//! gateway fetches a token from a stub NHS API platform token endpoint and sends to a stub BaRS
//! API, both over real TLS on loopback. The stub verifies the client assertion with RustCrypto's
//! `rsa` (not the ring code that signs it) and checks every claim.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use common::{TestGateway, TestPki, TestUpstream};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::signature::Verifier;
use rsa::{RsaPrivateKey, RsaPublicKey};
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const API_KEY: &str = "egress-test-api-key-0f3c9a";
const KID: &str = "TestSupplier-INT-1";
const TARGET: &str = "https://fhir.nhs.uk/Id/dos-service-id|2000011147";
const API_PATH: &str = "/booking-and-referral/FHIR/R4";

// ---------------------------------------------------------------------------------------------
// Captured logs: every test in this file logs into one buffer, as JSON, at debug.

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .json()
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    })
}

fn captured_logs() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The sender's key: one 2048-bit RSA key for the whole file (generation is the slow part).

struct SenderKey {
    private_pem: String,
    public: RsaPublicKey,
}

fn sender_key() -> &'static SenderKey {
    static KEY: OnceLock<SenderKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        SenderKey {
            private_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            public: RsaPublicKey::from(&key),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The stub NHS API platform: /oauth2/token and the BaRS API under /booking-and-referral/FHIR/R4.

/// What the token endpoint answers.
#[derive(Clone)]
enum TokenReply {
    /// A token with this `expires_in` JSON value.
    Token(serde_json::Value),
    /// An error answer.
    Error(u16, serde_json::Value),
}

/// One scripted BaRS API answer.
#[derive(Clone)]
struct Scripted {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    echo_ids: bool,
}

impl Scripted {
    fn status(status: u16) -> Scripted {
        Scripted {
            status,
            headers: vec![],
            body: operation_outcome(status),
            echo_ids: true,
        }
    }
}

fn operation_outcome(status: u16) -> String {
    serde_json::json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient", "details": {"coding": [{"code": format!("STATUS_{status}")}]}}]}).to_string()
}

/// A request the stub BaRS API received.
#[derive(Debug, Clone)]
struct ApiSeen {
    version: http::Version,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl ApiSeen {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

/// A decoded, verified client assertion.
#[derive(Debug, Clone)]
struct Assertion {
    header: serde_json::Value,
    claims: serde_json::Value,
}

#[derive(Default)]
struct StubState {
    token_url: Mutex<String>,
    token_reply: Mutex<Option<TokenReply>>,
    token_fetches: AtomicUsize,
    issued: Mutex<Vec<String>>,
    assertions: Mutex<Vec<Assertion>>,
    jwt_failures: Mutex<Vec<String>>,
    token_gate: Mutex<Option<Arc<Notify>>>,
    token_arrived: Notify,
    script: Mutex<VecDeque<Scripted>>,
    api_seen: Mutex<Vec<ApiSeen>>,
}

struct StubPlatform {
    addr: SocketAddr,
    state: Arc<StubState>,
}

impl StubPlatform {
    /// Offers h2 and HTTP/1.1 by ALPN, as the NHS API platform does.
    async fn start(pki: &TestPki) -> StubPlatform {
        StubPlatform::start_with_alpn(pki, vec![b"h2".to_vec(), b"http/1.1".to_vec()]).await
    }

    async fn start_with_alpn(pki: &TestPki, alpn: Vec<Vec<u8>>) -> StubPlatform {
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(pki.path("server-chain.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = alpn;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(StubState::default());
        *state.token_url.lock().unwrap() =
            format!("https://localhost:{}/oauth2/token", addr.port());
        *state.token_reply.lock().unwrap() = Some(TokenReply::Token("599".into()));
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let state = served.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |r| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(stub_answer(&state, r).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        StubPlatform { addr, state }
    }

    fn token_url(&self) -> String {
        self.state.token_url.lock().unwrap().clone()
    }

    fn api_base(&self) -> String {
        format!("https://localhost:{}{API_PATH}", self.addr.port())
    }

    fn set_token_reply(&self, reply: TokenReply) {
        *self.state.token_reply.lock().unwrap() = Some(reply);
    }

    fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state.script.lock().unwrap().extend(answers);
    }

    fn fetches(&self) -> usize {
        self.state.token_fetches.load(Ordering::SeqCst)
    }

    fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }

    fn api_seen(&self) -> Vec<ApiSeen> {
        self.state.api_seen.lock().unwrap().clone()
    }

    fn jwt_failures(&self) -> Vec<String> {
        self.state.jwt_failures.lock().unwrap().clone()
    }

    fn assertions(&self) -> Vec<Assertion> {
        self.state.assertions.lock().unwrap().clone()
    }
}

async fn stub_answer(state: &StubState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    if parts.uri.path() == "/oauth2/token" {
        return token_answer(state, &parts.headers, &body).await;
    }
    let seen = ApiSeen {
        version: parts.version,
        path: parts.uri.path_and_query().unwrap().to_string(),
        headers: parts.headers.clone(),
        body,
        at: Instant::now(),
    };
    state.api_seen.lock().unwrap().push(seen);
    let bearer = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let scripted = state.script.lock().unwrap().pop_front();
    let known_token = bearer.is_some_and(|t| state.issued.lock().unwrap().contains(&t));
    let answer = match scripted {
        Some(s) => s,
        None if !known_token => Scripted::status(401),
        None => Scripted {
            status: 200,
            headers: vec![("content-type", "application/fhir+json".into())],
            body: r#"{"resourceType":"Bundle","type":"message"}"#.into(),
            echo_ids: true,
        },
    };
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap();
    if answer.echo_ids {
        for name in ["x-request-id", "x-correlation-id"] {
            if let Some(v) = parts.headers.get(name) {
                response.headers_mut().insert(name, v.clone());
            }
        }
    }
    for (name, value) in answer.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

async fn token_answer(
    state: &StubState,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<Full<Bytes>> {
    state.token_fetches.fetch_add(1, Ordering::SeqCst);
    state.token_arrived.notify_waiters();
    let gate = state.token_gate.lock().unwrap().clone();
    if let Some(gate) = gate {
        gate.notified().await;
    }
    let json = |status: u16, v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    };
    let token_url = state.token_url.lock().unwrap().clone();
    match verify_token_request(headers, body, &token_url) {
        Ok(assertion) => state.assertions.lock().unwrap().push(assertion),
        Err(reason) => {
            state.jwt_failures.lock().unwrap().push(reason.clone());
            return json(
                401,
                serde_json::json!({"error": "invalid_client", "error_description": reason, "message_id": "stub-1"}),
            );
        }
    }
    match state.token_reply.lock().unwrap().clone().unwrap() {
        TokenReply::Error(status, body) => json(status, body),
        TokenReply::Token(expires_in) => {
            let token = format!("stub-token-{}", uuid::Uuid::new_v4().simple());
            state.issued.lock().unwrap().push(token.clone());
            json(
                200,
                serde_json::json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer", "issued_at": "1700000000000"}),
            )
        }
    }
}

/// The platform's checks, done independently of the gateway's code: form fields, then the JWT's
/// RS512 signature with the registered public key, then every header field and claim.
fn verify_token_request(
    headers: &HeaderMap,
    body: &[u8],
    token_url: &str,
) -> Result<Assertion, String> {
    if headers.get("content-type").map(|v| v.as_bytes())
        != Some(b"application/x-www-form-urlencoded")
    {
        return Err("content-type is not application/x-www-form-urlencoded".into());
    }
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err("grant_type".into());
    }
    if form.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err("client_assertion_type".into());
    }
    let jwt = form.get("client_assertion").ok_or("no client_assertion")?;
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("not a JWS compact serialisation".into());
    }
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|e| e.to_string())?;
    let verifier = rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(sender_key().public.clone());
    let signature =
        rsa::pkcs1v15::Signature::try_from(signature.as_slice()).map_err(|e| e.to_string())?;
    verifier
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .map_err(|e| format!("RS512 signature does not verify: {e}"))?;
    let decode = |p: &str| -> Result<serde_json::Value, String> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())
    };
    let header = decode(parts[0])?;
    let claims = decode(parts[1])?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let checks = [
        (header["alg"] == "RS512", "alg"),
        (header["typ"] == "JWT", "typ"),
        (header["kid"] == KID, "kid"),
        (claims["iss"] == API_KEY, "iss"),
        (claims["sub"] == API_KEY, "sub"),
        (claims["aud"] == token_url, "aud"),
        (
            claims["jti"]
                .as_str()
                .and_then(|j| uuid::Uuid::parse_str(j).ok())
                .is_some(),
            "jti",
        ),
        (
            claims["iat"]
                .as_i64()
                .is_some_and(|iat| (iat - now).abs() <= 5),
            "iat",
        ),
        (
            claims["exp"]
                .as_i64()
                .is_some_and(|exp| exp > now && exp <= now + 300),
            "exp",
        ),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(format!("{what} is wrong: header {header} claims {claims}"));
        }
    }
    Ok(Assertion { header, claims })
}

// ---------------------------------------------------------------------------------------------
// The gateway with [egress] pointed at the stub.

struct Rig {
    pki: TestPki,
    stub: StubPlatform,
    gateway: TestGateway,
    _upstream: TestUpstream,
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with("").await
    }

    /// `extra` is appended to the `[egress]` section.
    async fn start_with(extra: &str) -> Rig {
        let (pki, stub) = pki_and_stub().await;
        Rig::start_on(pki, stub, extra).await
    }

    async fn start_on(pki: TestPki, stub: StubPlatform, extra: &str) -> Rig {
        std::fs::write(pki.path("sender.key"), &sender_key().private_pem).unwrap();
        std::fs::write(pki.path("api-key"), format!("{API_KEY}\n")).unwrap();
        let upstream = TestUpstream::start().await;
        let text = format!(
            r#"{}
[egress]
address = "127.0.0.1:0"
environment = "custom"
api_base = "{}"
token_url = "{}"
ca = ["root.pem"]
key_id = "{KID}"
signing_key = "sender.key"
api_key_file = "api-key"
ods_code = "A1001"
organisation_name = "Test Trust"
initial_backoff = "10ms"
max_backoff = "50ms"
{extra}
"#,
            pki.config_toml(&upstream.url())
                .replace("audit = false", "audit = true"),
            stub.api_base(),
            stub.token_url(),
        );
        let gateway = TestGateway::start(pki.settings(&text)).await;
        Rig {
            pki,
            stub,
            gateway,
            _upstream: upstream,
        }
    }

    fn egress(&self) -> SocketAddr {
        self.gateway.egress.expect("egress listener")
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> common::Reply2 {
        send_plain(self.egress(), request).await
    }
}

/// A fresh PKI and a stub platform serving with its server certificate (logs captured).
async fn pki_and_stub() -> (TestPki, StubPlatform) {
    logs();
    let pki = TestPki::new();
    let stub = StubPlatform::start(&pki).await;
    (pki, stub)
}

/// One plain HTTP/1.1 request, as a legacy system sends it.
async fn send_plain(addr: SocketAddr, request: Request<Full<Bytes>>) -> common::Reply2 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    common::Reply2 {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn legacy_message() -> Request<Full<Bytes>> {
    let body = Bytes::from_static(include_bytes!(
        "fixtures/bars-examples/process-message-validation-request.json"
    ));
    Request::post("/$process-message")
        .header("host", "127.0.0.1")
        .header("x-bars-target", TARGET)
        .header("content-type", "application/fhir+json; version=1.0.0")
        .body(Full::new(body))
        .unwrap()
}

fn header(reply: &common::Reply2, name: &str) -> String {
    reply
        .headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn decode_b64_json(value: &str) -> serde_json::Value {
    serde_json::from_slice(&STANDARD.decode(value).unwrap()).unwrap()
}

fn assert_uuid_v4(text: &str) {
    let id = uuid::Uuid::parse_str(text).unwrap_or_else(|_| panic!("{text:?} is not a UUID"));
    assert_eq!(id.get_version_num(), 4, "{text}");
    assert_eq!(id.hyphenated().to_string(), text);
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_message_goes_out_with_a_verified_signed_jwt_token_and_completed_bars_headers() {
    let rig = Rig::start().await;
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(rig.stub.jwt_failures(), Vec::<String>::new());
    assert_eq!(rig.stub.fetches(), 1);
    let assertion = &rig.stub.assertions()[0];
    assert_eq!(assertion.header["kid"], KID);
    assert_eq!(assertion.claims["aud"], rig.stub.token_url());

    let seen = rig.stub.api_seen();
    assert_eq!(seen.len(), 1);
    let api = &seen[0];
    assert_eq!(api.path, format!("{API_PATH}/$process-message"));
    assert_eq!(
        api.header("authorization"),
        format!("Bearer {}", rig.stub.issued()[0])
    );
    assert_eq!(
        api.body,
        Bytes::from_static(include_bytes!(
            "fixtures/bars-examples/process-message-validation-request.json"
        ))
    );
    // Ids generated, valid, and the same ones returned to the legacy system.
    assert_uuid_v4(&api.header("x-request-id"));
    assert_uuid_v4(&api.header("x-correlation-id"));
    assert_eq!(header(&reply, "x-request-id"), api.header("x-request-id"));
    assert_eq!(
        header(&reply, "x-correlation-id"),
        api.header("x-correlation-id")
    );
    assert_eq!(header(&reply, "x-bars-attempts"), "1");
    // The plain target became the spec's Base64 JSON; Organisation and Software from config.
    let target = decode_b64_json(&api.header("nhsd-target-identifier"));
    assert_eq!(target["system"], "https://fhir.nhs.uk/Id/dos-service-id");
    assert_eq!(target["value"], "2000011147");
    let org = decode_b64_json(&api.header("nhsd-end-user-organisation"));
    assert_eq!(org["resourceType"], "Organization");
    assert_eq!(
        org["identifier"][0]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(org["identifier"][0]["value"], "A1001");
    assert_eq!(org["name"], "Test Trust");
    let software = decode_b64_json(&api.header("nhsd-requesting-software"));
    assert_eq!(software["resourceType"], "Device");
    assert_eq!(software["deviceName"]["name"], "bars-gateway");
    assert_eq!(software["version"]["value"], env!("CARGO_PKG_VERSION"));
    assert!(api.headers.get("x-bars-target").is_none());
    // Accept defaulted to the configured version; the legacy Content-Type passed through.
    assert_eq!(api.header("accept"), "application/fhir+json; version=1.1.0");
    assert_eq!(
        api.header("content-type"),
        "application/fhir+json; version=1.0.0"
    );
    // The API's answer, passed on.
    assert_eq!(reply.json()["resourceType"], "Bundle");
}

#[tokio::test]
async fn one_token_serves_many_requests_with_expires_in_as_a_string() {
    let rig = Rig::start().await;
    rig.stub.set_token_reply(TokenReply::Token("599".into()));
    for _ in 0..3 {
        assert_eq!(rig.send(legacy_message()).await.status, 200);
    }
    assert_eq!(rig.stub.fetches(), 1);
    let token = format!("Bearer {}", rig.stub.issued()[0]);
    assert!(rig
        .stub
        .api_seen()
        .iter()
        .all(|s| s.header("authorization") == token));
}

#[tokio::test]
async fn a_token_close_to_expiry_is_renewed_before_use_with_expires_in_as_a_number() {
    let rig = Rig::start().await;
    // 30 s left is inside the 60 s renewal margin: each request renews.
    rig.stub.set_token_reply(TokenReply::Token(30.into()));
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    assert_eq!(rig.stub.fetches(), 2);
    let issued = rig.stub.issued();
    let seen = rig.stub.api_seen();
    assert_eq!(
        seen[0].header("authorization"),
        format!("Bearer {}", issued[0])
    );
    assert_eq!(
        seen[1].header("authorization"),
        format!("Bearer {}", issued[1])
    );
    // Each assertion has its own jti.
    let a = rig.stub.assertions();
    assert_ne!(a[0].claims["jti"], a[1].claims["jti"]);
}

#[tokio::test]
async fn a_401_from_the_api_renews_the_token_once_and_resends_with_the_same_ids() {
    let rig = Rig::start().await;
    rig.stub.script([Scripted::status(401)]);
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "x-bars-attempts"), "2");
    assert_eq!(rig.stub.fetches(), 2);
    let seen = rig.stub.api_seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].header("x-request-id"),
        seen[1].header("x-request-id")
    );
    assert_eq!(
        seen[0].header("x-correlation-id"),
        seen[1].header("x-correlation-id")
    );
    assert_ne!(
        seen[0].header("authorization"),
        seen[1].header("authorization")
    );

    // A second 401 in a row is the answer: one renewal per request, no loop.
    rig.stub
        .script([Scripted::status(401), Scripted::status(401)]);
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 401);
    assert_eq!(header(&reply, "x-bars-attempts"), "2");
    assert_eq!(rig.stub.api_seen().len(), 4);
}

#[tokio::test]
async fn concurrent_requests_share_one_token_fetch() {
    let rig = Rig::start().await;
    let gate = Arc::new(Notify::new());
    *rig.stub.state.token_gate.lock().unwrap() = Some(gate.clone());
    let arrived = rig.stub.state.token_arrived.notified();
    let addr = rig.egress();
    let first = tokio::spawn(send_plain(addr, legacy_message()));
    arrived.await;
    // The first token request is held; these find no token and a fetch in flight.
    let others: Vec<_> = (0..7)
        .map(|_| tokio::spawn(send_plain(addr, legacy_message())))
        .collect();
    // A second token request would arrive now if the fetch were not shared.
    let second = rig.stub.state.token_arrived.notified();
    let _ = tokio::time::timeout(Duration::from_millis(500), second).await;
    *rig.stub.state.token_gate.lock().unwrap() = None;
    gate.notify_waiters();
    assert_eq!(first.await.unwrap().status, 200);
    for o in others {
        assert_eq!(o.await.unwrap().status, 200);
    }
    assert_eq!(rig.stub.fetches(), 1);
    assert_eq!(rig.stub.api_seen().len(), 8);
}

#[tokio::test]
async fn each_retryable_status_is_retried_with_the_same_ids_and_body() {
    let rig = Rig::start().await;
    for status in [408, 425, 429, 503, 504] {
        rig.stub.script([Scripted::status(status)]);
        let before = rig.stub.api_seen().len();
        let reply = rig.send(legacy_message()).await;
        assert_eq!(reply.status, 200, "after a {status}");
        assert_eq!(header(&reply, "x-bars-attempts"), "2", "after a {status}");
        let seen = rig.stub.api_seen();
        let (a, b) = (&seen[before], &seen[before + 1]);
        assert_eq!(
            a.header("x-request-id"),
            b.header("x-request-id"),
            "{status}"
        );
        assert_eq!(
            a.header("x-correlation-id"),
            b.header("x-correlation-id"),
            "{status}"
        );
        assert_eq!(a.body, b.body, "{status}");
        assert_eq!(header(&reply, "x-request-id"), a.header("x-request-id"));
    }
    assert_eq!(rig.stub.fetches(), 1);
}

#[tokio::test]
async fn answers_without_the_ids_or_an_operation_outcome_are_retried() {
    let rig = Rig::start().await;
    let mut no_ids = Scripted::status(200);
    no_ids.echo_ids = false;
    let mut not_fhir = Scripted::status(500);
    not_fhir.body = "<html>Bad gateway</html>".into();
    rig.stub.script([no_ids, not_fhir]);
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "x-bars-attempts"), "3");
}

#[tokio::test]
async fn no_retry_on_409_duplicate_or_on_400() {
    let rig = Rig::start().await;
    for status in [409, 400, 422] {
        rig.stub.script([Scripted::status(status)]);
        let before = rig.stub.api_seen().len();
        let reply = rig.send(legacy_message()).await;
        assert_eq!(reply.status, status);
        assert_eq!(header(&reply, "x-bars-attempts"), "1");
        assert_eq!(
            rig.stub.api_seen().len(),
            before + 1,
            "{status} was retried"
        );
        // The API's OperationOutcome reaches the legacy system intact.
        assert!(reply.diagnostics().is_empty());
        assert_eq!(
            reply.json()["issue"][0]["details"]["coding"][0]["code"],
            format!("STATUS_{status}")
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let rig = Rig::start_with("retry_budget = \"20s\"").await;
    let mut busy = Scripted::status(429);
    busy.headers.push(("retry-after", "1".into()));
    rig.stub.script([busy]);
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 200);
    let seen = rig.stub.api_seen();
    assert!(seen[1].at.duration_since(seen[0].at) >= Duration::from_secs(1));

    // A Retry-After past the budget ends the wait at once with that answer.
    let mut later = Scripted::status(503);
    later.headers.push(("retry-after", "120".into()));
    rig.stub.script([later]);
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 503);
    assert_eq!(header(&reply, "x-bars-attempts"), "1");
    assert_eq!(header(&reply, "retry-after"), "120");
}

#[tokio::test]
async fn when_attempts_run_out_the_legacy_system_gets_the_last_answer() {
    let rig = Rig::start_with("max_attempts = 3").await;
    rig.stub.script([
        Scripted::status(503),
        Scripted::status(503),
        Scripted::status(504),
    ]);
    let reply = rig.send(legacy_message()).await;
    assert_eq!(reply.status, 504);
    assert_eq!(header(&reply, "x-bars-attempts"), "3");
    assert_eq!(rig.stub.api_seen().len(), 3);
}

#[tokio::test]
async fn an_unreachable_api_gets_a_503_operation_outcome_counting_the_attempts() {
    let (pki, stub) = pki_and_stub().await;
    let dead = common::free_port();
    let rig = Rig::start_on(pki, stub, "max_attempts = 3").await;
    // Point a second gateway at a closed port for the API, the same stub for the token.
    let text = std::fs::read_to_string(rig.pki.path("config.toml"))
        .unwrap()
        .replace(
            &rig.stub.api_base(),
            &format!("https://localhost:{dead}{API_PATH}"),
        );
    let gateway = TestGateway::start(rig.pki.settings(&text)).await;
    let reply = send_plain(gateway.egress.unwrap(), legacy_message()).await;
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert!(
        reply.diagnostics().contains("after 3 attempt"),
        "{}",
        reply.diagnostics()
    );
    assert_eq!(header(&reply, "x-bars-attempts"), "3");
    assert_uuid_v4(&header(&reply, "x-request-id"));
}

#[tokio::test]
async fn legacy_supplied_ids_are_used_and_malformed_headers_are_refused_before_sending() {
    let rig = Rig::start().await;
    let request_id = uuid::Uuid::new_v4().to_string();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let mut request = legacy_message();
    request
        .headers_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    request
        .headers_mut()
        .insert("x-correlation-id", correlation_id.parse().unwrap());
    let reply = rig.send(request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(rig.stub.api_seen()[0].header("x-request-id"), request_id);
    assert_eq!(header(&reply, "x-correlation-id"), correlation_id);

    let cases: Vec<(&str, &str, &str)> = vec![
        ("x-request-id", "12345", "X-Request-Id"),
        ("x-correlation-id", "not-a-uuid", "X-Correlation-Id"),
        (
            "nhsd-end-user-organisation",
            "bm90IGpzb24=",
            "NHSD-End-User-Organisation",
        ),
        (
            "nhsd-requesting-software",
            "%%%",
            "NHSD-Requesting-Software",
        ),
        ("x-bars-target", "no-separator", "X-BaRS-Target"),
    ];
    for (name, value, named) in cases {
        let mut request = legacy_message();
        request.headers_mut().insert(name, value.parse().unwrap());
        let reply = rig.send(request).await;
        reply.assert_outcome(400, "REC_BAD_REQUEST", "value");
        assert!(
            reply.diagnostics().contains(named),
            "{name}: {}",
            reply.diagnostics()
        );
    }
    let mut no_target = legacy_message();
    no_target.headers_mut().remove("x-bars-target");
    let reply = rig.send(no_target).await;
    reply.assert_outcome(400, "REC_BAD_REQUEST", "invalid");
    assert!(reply.diagnostics().contains("NHSD-Target-Identifier"));
    // None of these reached the API.
    assert_eq!(rig.stub.api_seen().len(), 1);
}

#[tokio::test]
async fn a_token_endpoint_refusal_is_a_502_naming_the_cause_and_the_api_is_not_called() {
    let rig = Rig::start().await;
    rig.stub.set_token_reply(TokenReply::Error(
        400,
        serde_json::json!({"error": "invalid_request", "error_description": "Invalid 'kid' header in JWT - no matching public key", "message_id": "rrt-1234-5678"}),
    ));
    let reply = rig.send(legacy_message()).await;
    reply.assert_outcome(502, "REC_SERVER_ERROR", "security");
    let d = reply.diagnostics();
    assert!(
        d.contains("invalid_request")
            && d.contains("no matching public key")
            && d.contains("rrt-1234-5678"),
        "{d}"
    );
    assert_eq!(rig.stub.api_seen().len(), 0);
    // Logged with the message id, for the platform's support desk.
    assert!(captured_logs().contains("rrt-1234-5678"));
    // /readyz notices; a token fetched again makes it ready again is covered by the admin probe.
    let metrics = common::admin_get(rig.gateway.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("bars_gateway_egress_token_fetches_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bars_gateway_egress_requests_total{status=\"502\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_a_503() {
    let (pki, stub) = pki_and_stub().await;
    let dead = common::free_port();
    *stub.state.token_url.lock().unwrap() = format!("https://localhost:{dead}/oauth2/token");
    let rig = Rig::start_on(pki, stub, "").await;
    let reply = rig.send(legacy_message()).await;
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert!(
        reply
            .diagnostics()
            .contains("token endpoint is unavailable"),
        "{}",
        reply.diagnostics()
    );
    assert_eq!(rig.stub.api_seen().len(), 0);
}

#[tokio::test]
async fn metrics_count_egress_requests_attempts_and_token_fetches() {
    let rig = Rig::start().await;
    rig.stub.script([Scripted::status(503)]);
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    let metrics = common::admin_get(rig.gateway.admin.unwrap(), "/metrics").await;
    for line in [
        "bars_gateway_egress_requests_total{status=\"200\"} 1",
        "bars_gateway_egress_token_fetches_total{result=\"success\"} 1",
        "bars_gateway_egress_attempts_sum 2.0",
        "bars_gateway_egress_token_age_seconds ",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    assert!(!metrics.contains(&rig.stub.issued()[0]));
}

#[tokio::test]
async fn the_egress_listener_admits_only_allowed_addresses() {
    let rig = Rig::start_with("allowed_ips = [\"10.9.9.9/32\"]").await;
    let tcp = TcpStream::connect(rig.egress()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    assert!(sender.send_request(legacy_message()).await.is_err());
    assert_eq!(rig.stub.fetches(), 0);
}

#[tokio::test]
async fn tokens_assertions_and_the_api_key_never_reach_the_logs_or_audit_record() {
    let rig = Rig::start().await;
    rig.stub.script([Scripted::status(401)]);
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    let logs = captured_logs();
    // The audit record is there, with the ids and the attempt count...
    let request_id = rig.stub.api_seen()[0].header("x-request-id");
    let audit = logs
        .lines()
        .find(|l| l.contains("\"egress request\"") && l.contains(&request_id))
        .unwrap_or_else(|| panic!("no egress audit record for {request_id}"));
    assert!(audit.contains("\"attempts\":2"), "{audit}");
    assert!(audit.contains(TARGET), "{audit}");
    // ...and no secret anywhere: not the API key, not a token, not an assertion (a JWS whose
    // header starts `{"` encodes to `eyJ`).
    assert!(!logs.contains(API_KEY));
    for token in rig.stub.issued() {
        assert!(!logs.contains(&token), "token in logs");
    }
    assert!(!logs.contains("eyJ"), "an assertion in the logs");
    assert!(
        !logs.contains("Bearer"),
        "an Authorization header in the logs"
    );
}

#[tokio::test]
async fn the_sandbox_environment_sends_without_a_token() {
    let (pki, stub) = pki_and_stub().await;
    let upstream = TestUpstream::start().await;
    let text = format!(
        "{}\n[egress]\naddress = \"127.0.0.1:0\"\nenvironment = \"sandbox\"\napi_base = \"{}\"\nca = [\"root.pem\"]\n",
        pki.config_toml(&upstream.url()),
        stub.api_base()
    );
    let gateway = TestGateway::start(pki.settings(&text)).await;
    let mut ok = Scripted::status(200);
    ok.body = "{\"resourceType\":\"Bundle\"}".into();
    stub.script([ok]);
    let reply = send_plain(gateway.egress.unwrap(), legacy_message()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(stub.fetches(), 0);
    assert!(stub.api_seen()[0].headers.get("authorization").is_none());
}

#[test]
fn keygen_writes_a_key_the_gateway_loads_and_check_prints_its_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let bin = env!("CARGO_BIN_EXE_bars-gateway");
    std::fs::write(dir.path().join("pw"), "correct horse\n").unwrap();
    let run = std::process::Command::new(bin)
        .args([
            "keygen",
            "--kid",
            "TestSupplier-INT-7",
            "--bits",
            "2048",
            "--password-file",
        ])
        .arg(dir.path().join("pw"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("TestSupplier-INT-7") && stdout.contains("Next steps"),
        "{stdout}"
    );
    let key = out.join("TestSupplier-INT-7.key");
    let key_pem = std::fs::read_to_string(&key).unwrap();
    assert!(key_pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = std::fs::read_to_string(out.join("TestSupplier-INT-7.pub.pem")).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    let jwks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("TestSupplier-INT-7.jwks.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "TestSupplier-INT-7");
    assert_eq!(jwks["keys"][0]["alg"], "RS512");
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
    // The JWKS modulus is the public key's.
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let public_key = RsaPublicKey::from_public_key_pem(&public).unwrap();
    assert_eq!(
        jwks["keys"][0]["n"],
        URL_SAFE_NO_PAD.encode(public_key.n().to_bytes_be())
    );
    // Never overwrites.
    let again = std::process::Command::new(bin)
        .args([
            "keygen",
            "--kid",
            "TestSupplier-INT-7",
            "--bits",
            "2048",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));

    // check loads the encrypted key and prints the same JWKS.
    let pki = TestPki::new();
    std::fs::copy(&key, pki.path("sender.key")).unwrap();
    std::fs::copy(dir.path().join("pw"), pki.path("key-password")).unwrap();
    std::fs::write(pki.path("api-key"), API_KEY).unwrap();
    let text = format!(
        "{}\n[egress]\nenvironment = \"int\"\nkey_id = \"TestSupplier-INT-7\"\nsigning_key = \"sender.key\"\nsigning_key_password_file = \"key-password\"\napi_key_file = \"api-key\"\nca = [\"root.pem\"]\n",
        pki.config_toml("http://127.0.0.1:9")
    );
    std::fs::write(pki.path("config.toml"), text).unwrap();
    let check = std::process::Command::new(bin)
        .arg("check")
        .arg("--config")
        .arg(pki.path("config.toml"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(report.contains("RS512, 2048-bit RSA"), "{report}");
    assert!(
        report.contains(&public.lines().nth(1).unwrap().to_string()),
        "{report}"
    );
    assert!(
        report.contains(jwks["keys"][0]["n"].as_str().unwrap()),
        "{report}"
    );
    assert!(!report.contains(API_KEY));
}

#[tokio::test]
async fn readyz_fails_while_token_requests_fail_and_recovers_with_the_next_token() {
    let rig = Rig::start().await;
    let admin = rig.gateway.admin.unwrap();
    // Readiness is computed in the background (upstream probe): poll until it is first ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(admin).await {
        assert!(Instant::now() < deadline, "/readyz never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.stub.set_token_reply(TokenReply::Error(
        400,
        serde_json::json!({"error": "invalid_request", "error_description": "Missing 'kid' header in JWT", "message_id": "rrt-9"}),
    ));
    assert_eq!(rig.send(legacy_message()).await.status, 502);
    let report = readyz(admin).await;
    assert_eq!(report["ready"], false, "{report}");
    assert_eq!(
        report["egress_token"], "the latest access token request failed",
        "{report}"
    );
    rig.stub.set_token_reply(TokenReply::Token("599".into()));
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    assert!(ready(admin).await);
}

/// The `/readyz` JSON report.
async fn readyz(admin: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&common::admin_get(admin, "/readyz").await).expect("/readyz is JSON")
}

async fn ready(admin: std::net::SocketAddr) -> bool {
    readyz(admin).await["ready"] == true
}

#[tokio::test]
async fn the_api_is_called_over_h2_when_offered_and_over_http1_otherwise() {
    let rig = Rig::start().await;
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    assert_eq!(rig.stub.api_seen()[0].version, http::Version::HTTP_2);

    logs();
    let pki = TestPki::new();
    let stub = StubPlatform::start_with_alpn(&pki, vec![b"http/1.1".to_vec()]).await;
    let rig = Rig::start_on(pki, stub, "").await;
    assert_eq!(rig.send(legacy_message()).await.status, 200);
    assert_eq!(rig.stub.api_seen()[0].version, http::Version::HTTP_11);
    assert_eq!(rig.stub.fetches(), 1);
}
