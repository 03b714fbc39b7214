//! The demo's second role: the legacy system as a BaRS *sender*, through the gateway's egress
//! listener, to a stand-in for the NHS API platform on loopback. The stand-in's token endpoint
//! verifies the gateway's signed JWT (RS512 with the registered public key, and every claim) with
//! RustCrypto's `rsa`, not the ring code that signed it; its BaRS API relays each request over
//! TLS-MA to the gateway's receiver side, as the real proxy would, which delivers it to the sample
//! legacy receiver. The first delivery is answered with a forced 503 so the retry shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rsa::pkcs8::DecodePublicKey as _;
use rsa::signature::Verifier as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use super::pki::DemoPki;
use super::DemoError;

/// The KID the demo registers with its stand-in platform.
pub const DEMO_KID: &str = "DemoSupplier-INT-1";
const DEMO_API_KEY: &str = "demo-api-key";
const API_PATH: &str = "/booking-and-referral/FHIR/R4";
/// The plain target the demo's legacy sender names.
const DEMO_TARGET: &str = "https://fhir.nhs.uk/Id/dos-service-id|2000011147";

struct StandInState {
    public_key: rsa::RsaPublicKey,
    token_url: String,
    token_fetches: AtomicUsize,
    jwt_problems: Mutex<Vec<String>>,
    issued: Mutex<Vec<String>>,
    fail_next_delivery: AtomicBool,
    /// `(X-Request-Id, X-Correlation-Id)` of every call to the stand-in's BaRS API.
    api_calls: Mutex<Vec<(String, String)>>,
    gateway: Mutex<Option<SocketAddr>>,
    relay_tls: Arc<rustls::ClientConfig>,
}

/// The stand-in NHS API platform (token endpoint + BaRS API relay), bound but not yet serving.
pub struct StandIn {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<StandInState>,
    key_file: PathBuf,
    api_key_file: PathBuf,
}

impl StandIn {
    /// Makes the sender's key pair (`keygen`, 2048 bits to keep the demo quick), writes the API
    /// key, and binds the stand-in on loopback with the demo server certificate.
    pub async fn bind(
        pki: &DemoPki,
        relay_tls: Arc<rustls::ClientConfig>,
    ) -> Result<StandIn, DemoError> {
        let keys = pki.dir.join("sender");
        let files = crate::keygen::generate(DEMO_KID, &keys, 2048, None)
            .map_err(|e| DemoError::new("cannot make the sender's key pair", e))?;
        let api_key_file = keys.join("api-key");
        std::fs::write(&api_key_file, DEMO_API_KEY)
            .map_err(|e| DemoError::new("cannot write the demo API key", e))?;
        let public_pem = std::fs::read_to_string(&files.public_key)
            .map_err(|e| DemoError::new("cannot read the sender's public key", e))?;
        let public_key = rsa::RsaPublicKey::from_public_key_pem(&public_pem)
            .map_err(|e| DemoError::new("the sender's public key", e))?;
        let acceptor = server_tls(pki)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DemoError::new("cannot bind the stand-in BaRS API", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| DemoError::new("stand-in address", e))?
            .port();
        Ok(StandIn {
            listener,
            acceptor,
            key_file: files.private_key,
            api_key_file,
            state: Arc::new(StandInState {
                public_key,
                token_url: format!("https://localhost:{port}/oauth2/token"),
                token_fetches: AtomicUsize::new(0),
                jwt_problems: Mutex::new(Vec::new()),
                issued: Mutex::new(Vec::new()),
                fail_next_delivery: AtomicBool::new(true),
                api_calls: Mutex::new(Vec::new()),
                gateway: Mutex::new(None),
                relay_tls,
            }),
        })
    }

    /// The gateway's `[egress]` section pointing at this stand-in.
    pub fn egress_toml(&self) -> String {
        let port = self.listener.local_addr().map(|a| a.port()).unwrap_or(0);
        format!(
            r#"
[egress]
# The legacy system as a sender: plain HTTP here, HTTPS with a signed-JWT token to the stand-in.
address = "127.0.0.1:0"
environment = "custom"
api_base = "https://localhost:{port}{API_PATH}"
token_url = "{token_url}"
ca = ["root.pem"]
key_id = "{DEMO_KID}"
signing_key = "{key}"
api_key_file = "{api_key}"
ods_code = "A1001"
organisation_name = "Demo Trust"
initial_backoff = "200ms"
"#,
            token_url = self.state.token_url,
            key = self.key_file.display(),
            api_key = self.api_key_file.display(),
        )
    }

    /// Serves until the runtime ends, relaying BaRS API calls to the gateway's receiver side.
    pub fn serve(self, gateway: SocketAddr) -> StandInHandle {
        if let Ok(mut g) = self.state.gateway.lock() {
            *g = Some(gateway);
        }
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = self.listener.accept().await else {
                    return;
                };
                let acceptor = self.acceptor.clone();
                let state = self.state.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |r| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, r).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        StandInHandle { state, task }
    }
}

/// The serving stand-in; stops when dropped.
pub struct StandInHandle {
    state: Arc<StandInState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandInHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn server_tls(pki: &DemoPki) -> Result<tokio_rustls::TlsAcceptor, DemoError> {
    let chain = CertificateDer::pem_file_iter(&pki.server_chain)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| DemoError::new("the demo server chain", e))?;
    let key = PrivateKeyDer::from_pem_file(&pki.server_key)
        .map_err(|e| DemoError::new("the demo server key", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DemoError::new("TLS", e))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| DemoError::new("the demo server certificate", e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(state: &StandInState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({}));
    };
    if parts.uri.path() == "/oauth2/token" {
        state.token_fetches.fetch_add(1, Ordering::SeqCst);
        return match verify_assertion(state, &body) {
            Ok(()) => {
                let token = uuid::Uuid::new_v4().simple().to_string();
                if let Ok(mut issued) = state.issued.lock() {
                    issued.push(token.clone());
                }
                json(
                    StatusCode::OK,
                    serde_json::json!({"access_token": token, "expires_in": "599", "token_type": "Bearer"}),
                )
            }
            Err(problem) => {
                if let Ok(mut p) = state.jwt_problems.lock() {
                    p.push(problem.clone());
                }
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "invalid_client", "error_description": problem, "message_id": "demo"}),
                )
            }
        };
    }
    let text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    if let Ok(mut calls) = state.api_calls.lock() {
        calls.push((text("x-request-id"), text("x-correlation-id")));
    }
    let bearer = text("authorization");
    let known = bearer
        .strip_prefix("Bearer ")
        .is_some_and(|t| state.issued.lock().is_ok_and(|i| i.iter().any(|x| x == t)));
    if !known {
        return json(
            StatusCode::UNAUTHORIZED,
            outcome("REC_UNAUTHORIZED", "security"),
        );
    }
    let with_ids = |mut r: Response<Full<Bytes>>| {
        for name in ["x-request-id", "x-correlation-id"] {
            if let Some(v) = parts.headers.get(name) {
                r.headers_mut().insert(name, v.clone());
            }
        }
        r
    };
    if state.fail_next_delivery.swap(false, Ordering::SeqCst) {
        return with_ids(json(
            StatusCode::SERVICE_UNAVAILABLE,
            outcome("REC_SERVICE_UNAVAILABLE", "transient"),
        ));
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .strip_prefix(API_PATH)
        .unwrap_or("/")
        .to_string();
    match relay(state, &parts, &path, body).await {
        Ok(r) => r,
        Err(_) => with_ids(json(
            StatusCode::SERVICE_UNAVAILABLE,
            outcome("REC_SERVICE_UNAVAILABLE", "transient"),
        )),
    }
}

fn outcome(code: &str, issue: &str) -> serde_json::Value {
    serde_json::json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": issue,
        "details": {"coding": [{"system": crate::bars::errors::ERROR_CODE_SYSTEM, "code": code}]}}]})
}

/// The proxy's hop: the same request, minus the sender's token, over TLS-MA to the receiver side.
async fn relay(
    state: &StandInState,
    parts: &http::request::Parts,
    path: &str,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let gateway = state
        .gateway
        .lock()
        .ok()
        .and_then(|g| *g)
        .ok_or("no gateway")?;
    let tcp = TcpStream::connect(gateway).await?;
    let tls = tokio_rustls::TlsConnector::from(state.relay_tls.clone())
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = path.parse()?;
    for (name, value) in &parts.headers {
        if name != http::header::AUTHORIZATION && name != http::header::HOST {
            request.headers_mut().append(name, value.clone());
        }
    }
    request.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("localhost"),
    );
    let response =
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await??;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// The platform's checks: form, RS512 signature with the registered key, header and claims.
fn verify_assertion(state: &StandInState, form: &[u8]) -> Result<(), String> {
    let fields: std::collections::HashMap<String, String> =
        form_urlencoded::parse(form).into_owned().collect();
    if fields.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err("grant_type must be client_credentials".into());
    }
    if fields.get("client_assertion_type").map(String::as_str)
        != Some(crate::egress::token::ASSERTION_TYPE)
    {
        return Err("wrong client_assertion_type".into());
    }
    let jwt = fields
        .get("client_assertion")
        .ok_or("no client_assertion")?;
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return Err("not a JWT".into());
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "signature is not base64url")?;
    let signature =
        rsa::pkcs1v15::Signature::try_from(signature.as_slice()).map_err(|e| e.to_string())?;
    rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(state.public_key.clone())
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| "RS512 signature does not verify with the registered key")?;
    let decode = |p: &str| -> Result<serde_json::Value, String> {
        let bytes = URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    let (header, claims) = (decode(header)?, decode(claims)?);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let exp = claims["exp"].as_i64().unwrap_or_default();
    let checks = [
        (header["alg"] == "RS512", "alg must be RS512"),
        (header["typ"] == "JWT", "typ must be JWT"),
        (header["kid"] == DEMO_KID, "unknown kid"),
        (
            claims["iss"] == DEMO_API_KEY && claims["sub"] == DEMO_API_KEY,
            "iss and sub must be the API key",
        ),
        (
            claims["aud"] == state.token_url.as_str(),
            "aud must be the token URL",
        ),
        (
            claims["jti"]
                .as_str()
                .is_some_and(|j| uuid::Uuid::parse_str(j).is_ok()),
            "jti must be a UUID",
        ),
        (
            exp > now && exp <= now + 300,
            "exp must be within 5 minutes",
        ),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, problem)) => Err((*problem).to_string()),
        None => Ok(()),
    }
}

/// One row of the sending table.
pub struct SendRow {
    /// What was done.
    pub what: String,
    /// What was expected.
    pub expected: String,
    /// What happened.
    pub got: String,
    /// Whether it was as expected.
    pub ok: bool,
}

struct Answer {
    status: u16,
    attempts: String,
    request_id: String,
    correlation_id: String,
    code: Option<String>,
}

async fn send_as_legacy(
    egress: SocketAddr,
    ids: Option<(&str, &str)>,
    body: &'static [u8],
) -> Result<Answer, DemoError> {
    let tcp = TcpStream::connect(egress)
        .await
        .map_err(|e| DemoError::new("cannot reach the egress listener", e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| DemoError::new("egress listener", e))?;
    tokio::spawn(conn);
    let mut request = Request::post("/$process-message")
        .header("host", "127.0.0.1")
        .header("x-bars-target", DEMO_TARGET)
        .body(Full::new(Bytes::from_static(body)))
        .map_err(|e| DemoError::new("request", e))?;
    if let Some((request_id, correlation_id)) = ids {
        for (name, value) in [
            ("x-request-id", request_id),
            ("x-correlation-id", correlation_id),
        ] {
            if let Ok(v) = http::HeaderValue::from_str(value) {
                request.headers_mut().insert(name, v);
            }
        }
    }
    let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
        .await
        .map_err(|e| DemoError::new("no answer from the egress listener", e))?
        .map_err(|e| DemoError::new("egress request", e))?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (status, attempts, request_id, correlation_id) = (
        response.status().as_u16(),
        header("x-bars-attempts"),
        header("x-request-id"),
        header("x-correlation-id"),
    );
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| DemoError::new("egress answer", e))?
        .to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["issue"][0]["details"]["coding"][0]["code"]
                .as_str()
                .map(str::to_string)
        });
    Ok(Answer {
        status,
        attempts,
        request_id,
        correlation_id,
        code,
    })
}

/// The round trip: a message sent through the egress listener (its first delivery forced to a
/// 503, so the retry with the same ids shows), then the same message again, which earns a 409.
pub async fn run_round_trip(
    egress: SocketAddr,
    stand_in: &StandInHandle,
    body: &'static [u8],
) -> Result<Vec<SendRow>, DemoError> {
    let state = &stand_in.state;
    let first = send_as_legacy(egress, None, body).await?;
    let calls = state
        .api_calls
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    let fetches = state.token_fetches.load(Ordering::SeqCst);
    let problems = state
        .jwt_problems
        .lock()
        .map(|p| p.join("; "))
        .unwrap_or_default();
    let mut rows = vec![SendRow {
        what: "token: signed JWT (RS512, kid) to /oauth2/token".into(),
        expected: "1 fetch, signature and claims verified".into(),
        got: if problems.is_empty() {
            format!("{fetches} fetch, verified")
        } else {
            format!("{fetches} fetch, refused: {problems}")
        },
        ok: fetches == 1 && problems.is_empty(),
    }];
    let same_ids = calls.len() == 2 && calls[0] == calls[1] && calls[0].0 == first.request_id;
    rows.push(SendRow {
        what: "POST /$process-message via egress (1st delivery: forced 503)".into(),
        expected: "200 after 2 attempts, same ids".into(),
        got: format!(
            "{} after {} attempts, {}",
            first.status,
            first.attempts,
            if same_ids { "same ids" } else { "ids differ" }
        ),
        ok: first.status == 200 && first.attempts == "2" && same_ids,
    });
    let repeat = send_as_legacy(
        egress,
        Some((&first.request_id, &first.correlation_id)),
        body,
    )
    .await?;
    rows.push(SendRow {
        what: "the same message again (same ids)".into(),
        expected: "409 REC_CONFLICT, 1 attempt, no retry".into(),
        got: format!(
            "{} {}, {} attempt",
            repeat.status,
            repeat.code.as_deref().unwrap_or("-"),
            repeat.attempts
        ),
        ok: repeat.status == 409
            && repeat.code.as_deref() == Some("REC_CONFLICT")
            && repeat.attempts == "1",
    });
    Ok(rows)
}

/// The sending table.
pub fn render(rows: &[SendRow]) -> String {
    let mut text = String::new();
    for row in rows {
        text.push_str(&format!(
            "  {:<62} expected {:<40} got {:<32} {}\n",
            row.what,
            row.expected,
            row.got,
            if row.ok { "ok" } else { "UNEXPECTED" }
        ));
    }
    text
}

/// Where the egress curl line in "try it yourself" points.
pub fn curl_line(egress: SocketAddr, body_file: &Path) -> String {
    format!(
        "  curl -sS -i 'http://{egress}/$process-message' -H 'X-BaRS-Target: {DEMO_TARGET}' --data-binary @{}",
        body_file.display()
    )
}
