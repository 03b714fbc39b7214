//! Shared end-to-end harness: a PKI shaped like the NHS one (root → sub-CA → leaves, made with
//! rcgen), a counting upstream, the gateway in-process on port 0, and a real TLS client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bars_gateway::config::Settings;
use bars_gateway::demo::pki::{ca_params, client_params};
use bars_gateway::Gateway;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

mod skip;
#[allow(unused_imports)] // each test crate uses only some of them
pub use skip::{running_in_ci, skip, tool_runs};

/// The CN the BaRS PROD proxy presents (BARS-CONTEXT.md).
pub const PROXY_CN: &str = "bars-proxy.spineservices.nhs.uk";
/// Serial number of the revoked client certificate.
pub const REVOKED_SERIAL: u64 = 0x0666;

/// The client certificates the PKI issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// The BaRS proxy: CN bars-proxy.spineservices.nhs.uk, O=nhs, OU=Devices, no SAN.
    Proxy,
    /// Chains fine but has another CN.
    WrongSubject,
    /// The proxy's CN, but expired.
    Expired,
    /// The proxy's CN, revoked by the sub-CA's CRL.
    Revoked,
    /// The proxy's CN, issued by a CA the gateway does not trust.
    Rogue,
    /// The proxy's CN, issued by an impostor CA with exactly the trusted sub-CA's name.
    Impostor,
    /// The proxy's CN, valid for a few seconds: made by [`TestPki::issue_short_lived_client`].
    ShortLived,
}

impl ClientCert {
    fn file_stem(self) -> &'static str {
        match self {
            ClientCert::Proxy => "client-proxy",
            ClientCert::WrongSubject => "client-wrong-subject",
            ClientCert::Expired => "client-expired",
            ClientCert::Revoked => "client-revoked",
            ClientCert::Rogue => "client-rogue",
            ClientCert::Impostor => "client-impostor",
            ClientCert::ShortLived => "client-short-lived",
        }
    }
}

/// A throwaway PKI written to a temp dir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    sub: Issuer<'static, KeyPair>,
    server_key: KeyPair,
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

impl TestPki {
    /// Root → sub-CA → server leaf (localhost) and the client certificates of [`ClientCert`],
    /// plus a CRL from the sub-CA revoking [`ClientCert::Revoked`].
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("Test NHS Root Authority");
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = Issuer::new(root_params, root_key);
        let sub_key = KeyPair::generate().unwrap();
        let sub_params = ca_params("Test NHS Level 1C");
        let sub_cert = sub_params.signed_by(&sub_key, &root).unwrap();
        write(d, "root.pem", &root_cert.pem());
        write(d, "sub.pem", &sub_cert.pem());
        write(d, "sub.key", &sub_key.serialize_pem());
        let sub = Issuer::new(sub_params, sub_key);

        // Server: localhost, chain = leaf + sub-CA.
        let server_key = KeyPair::generate().unwrap();
        let mut sp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.serial_number = Some(SerialNumber::from(1u64));
        let server_cert = sp.signed_by(&server_key, &sub).unwrap();
        write(
            d,
            "server-chain.pem",
            &format!("{}{}", server_cert.pem(), sub_cert.pem()),
        );
        write(d, "server.key", &server_key.serialize_pem());

        // A second server key, for mismatch tests.
        write(
            d,
            "other.key",
            &KeyPair::generate().unwrap().serialize_pem(),
        );

        let issue = |name: ClientCert, params: CertificateParams, issuer: &Issuer<'_, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            write(d, &format!("{}.pem", name.file_stem()), &cert.pem());
            write(
                d,
                &format!("{}.key", name.file_stem()),
                &key.serialize_pem(),
            );
        };
        issue(
            ClientCert::Proxy,
            client_params(PROXY_CN, Some(0x1001)),
            &sub,
        );
        issue(
            ClientCert::WrongSubject,
            client_params("someone-else.nhs.uk", Some(0x1002)),
            &sub,
        );
        let mut expired = client_params(PROXY_CN, Some(0x1003));
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        issue(ClientCert::Expired, expired, &sub);
        issue(
            ClientCert::Revoked,
            client_params(PROXY_CN, Some(REVOKED_SERIAL)),
            &sub,
        );

        let rogue_key = KeyPair::generate().unwrap();
        let rogue_params = ca_params("Rogue Level 1C");
        let rogue_cert = rogue_params.self_signed(&rogue_key).unwrap();
        write(d, "rogue-ca.pem", &rogue_cert.pem());
        let rogue = Issuer::new(rogue_params, rogue_key);
        issue(
            ClientCert::Rogue,
            client_params(PROXY_CN, Some(0x1005)),
            &rogue,
        );
        let impostor_key = KeyPair::generate().unwrap();
        let impostor = Issuer::new(ca_params("Test NHS Level 1C"), impostor_key);
        issue(
            ClientCert::Impostor,
            client_params(PROXY_CN, Some(0x1006)),
            &impostor,
        );

        let now = time::OffsetDateTime::now_utc();
        let crl = CertificateRevocationListParams {
            this_update: now - time::Duration::days(1),
            next_update: now + time::Duration::days(30),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(REVOKED_SERIAL),
                revocation_time: now - time::Duration::hours(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&sub)
        .unwrap();
        write(d, "sub.crl.pem", &crl.pem().unwrap());
        let empty_crl = CertificateRevocationListParams {
            this_update: now - time::Duration::days(1),
            next_update: now + time::Duration::days(30),
            crl_number: SerialNumber::from(2u64),
            issuing_distribution_point: None,
            revoked_certs: vec![],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&sub)
        .unwrap();
        write(d, "empty.crl.pem", &empty_crl.pem().unwrap());
        TestPki {
            dir,
            sub,
            server_key,
        }
    }

    /// Issues [`ClientCert::ShortLived`]: the proxy's CN from the trusted sub-CA, valid from a
    /// minute ago until `lifetime` from now. Returns its notAfter.
    pub fn issue_short_lived_client(&self, lifetime: Duration) -> std::time::SystemTime {
        let now = time::OffsetDateTime::now_utc();
        let not_after = now + lifetime;
        let mut params = client_params(PROXY_CN, Some(0x1007));
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.sub).unwrap();
        let stem = ClientCert::ShortLived.file_stem();
        write(self.dir.path(), &format!("{stem}.pem"), &cert.pem());
        write(
            self.dir.path(),
            &format!("{stem}.key"),
            &key.serialize_pem(),
        );
        not_after.into()
    }

    /// Replaces a file the way operators should: write beside it, then rename into place.
    pub fn replace_file(&self, name: &str, contents: &[u8]) {
        let tmp = self.path(&format!(".{name}.new"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }

    /// Issues a new server certificate (same key, new serial) and renames it into place as
    /// `server-chain.pem`; returns its SHA-256.
    pub fn reissue_server(&self, serial: u64) -> String {
        let mut sp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.serial_number = Some(SerialNumber::from(serial));
        let cert = sp.signed_by(&self.server_key, &self.sub).unwrap();
        let sub_pem = std::fs::read_to_string(self.path("sub.pem")).unwrap();
        self.replace_file(
            "server-chain.pem",
            format!("{}{}", cert.pem(), sub_pem).as_bytes(),
        );
        bars_gateway::tls::inspect::CertSummary::from_der(cert.der())
            .unwrap()
            .sha256_hex()
    }

    /// A file in the PKI's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// SHA-256 (hex) of a client certificate.
    pub fn client_sha256(&self, which: ClientCert) -> String {
        let der = CertificateDer::from_pem_file(self.path(&format!("{}.pem", which.file_stem())))
            .unwrap();
        bars_gateway::tls::inspect::CertSummary::from_der(&der)
            .unwrap()
            .sha256_hex()
    }

    /// A rustls client config trusting the test root, presenting `cert` (or none).
    pub fn client_config(&self, cert: Option<ClientCert>) -> Arc<rustls::ClientConfig> {
        self.client_config_with(
            cert,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            vec![b"http/1.1".to_vec()],
        )
    }

    /// A client config with chosen TLS versions and ALPN protocols.
    pub fn client_config_with(
        &self,
        cert: Option<ClientCert>,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: Vec<Vec<u8>>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("root.pem")).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match cert {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let chain = vec![CertificateDer::from_pem_file(
                    self.path(&format!("{}.pem", c.file_stem())),
                )
                .unwrap()];
                let key =
                    PrivateKeyDer::from_pem_file(self.path(&format!("{}.key", c.file_stem())))
                        .unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = alpn;
        Arc::new(config)
    }

    /// A gateway config (TOML) for this PKI and `upstream_url`, loopback only, admin on port 0.
    pub fn config_toml(&self, upstream_url: &str) -> String {
        format!(
            r#"
[listen]
address = "127.0.0.1:0"
header_read_timeout = "5s"
shutdown_grace = "5s"

[tls]
certificate = "server-chain.pem"
private_key = "server.key"
client_ca = ["root.pem", "sub.pem"]
client_crl = ["sub.crl.pem"]

[client]
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["{PROXY_CN}"]

[upstream]
url = "{upstream_url}"
request_timeout = "2s"

[admin]
address = "127.0.0.1:0"

[log]
level = "warn"
format = "text"
audit = false
"#
        )
    }

    /// Writes `text` as this PKI's `config.toml` and parses it (relative paths resolve here).
    pub fn settings(&self, text: &str) -> Settings {
        let path = self.path("config.toml");
        std::fs::write(&path, text).unwrap();
        bars_gateway::config::load(&path).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How the test upstream answers.
#[derive(Clone)]
pub enum Reply {
    /// Status, extra headers, body.
    With(StatusCode, Vec<(&'static str, &'static str)>, Bytes),
    /// Never answers (until the test ends).
    Never,
    /// Answers with the status once the gate opens (`Notify::notify_waiters` or a permit).
    Gated(Arc<tokio::sync::Semaphore>, StatusCode),
}

/// A counting upstream on loopback that records every request.
pub struct TestUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    reply: Arc<Mutex<Reply>>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    /// Starts an upstream answering 200 with a small FHIR body.
    pub async fn start() -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(Mutex::new(Reply::With(
            StatusCode::OK,
            vec![("content-type", "application/fhir+json")],
            Bytes::from_static(br#"{"resourceType":"Bundle"}"#),
        )));
        let arrived = Arc::new(Notify::new());
        let (s, r, a) = (seen.clone(), reply.clone(), arrived.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, r, a) = (s.clone(), r.clone(), a.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, r, a) = (s.clone(), r.clone(), a.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            s.lock().unwrap().push(Seen {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            });
                            a.notify_waiters();
                            let reply = r.lock().unwrap().clone();
                            match reply {
                                Reply::Never => std::future::pending::<
                                    Result<Response<Full<Bytes>>, Infallible>,
                                >()
                                .await,
                                Reply::Gated(gate, status) => {
                                    let _permit = gate.acquire().await;
                                    let mut resp =
                                        Response::new(Full::new(Bytes::from_static(b"{}")));
                                    *resp.status_mut() = status;
                                    Ok(resp)
                                }
                                Reply::With(status, headers, body) => {
                                    let mut resp = Response::new(Full::new(body));
                                    *resp.status_mut() = status;
                                    for (k, v) in headers {
                                        resp.headers_mut().insert(k, HeaderValue::from_static(v));
                                    }
                                    Ok::<_, Infallible>(resp)
                                }
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestUpstream {
            addr,
            seen,
            reply,
            arrived,
            task,
        }
    }

    /// Stops accepting connections (the listener is closed: connects are refused).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how it answers.
    pub fn set_reply(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    /// How many requests reached it.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The requests that reached it.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have reached it (no polling: woken on each arrival).
    pub async fn wait_for_count(&self, n: usize) {
        wait_until(&self.arrived, || self.count() >= n).await
    }

    /// The one request that reached it.
    pub fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(seen.len(), 1, "expected exactly one upstream request");
        seen.into_iter().next().unwrap()
    }
}

/// A port on loopback with nothing listening (bound then released).
pub async fn dead_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------------------------

/// A running gateway; stops (and drains) when dropped or on [`TestGateway::stop`].
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// The egress listener, when `[egress]` is configured.
    pub egress: Option<SocketAddr>,
    pub reloader: Arc<bars_gateway::Reloader>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    /// Binds and serves `settings` in this runtime.
    pub async fn start(settings: Settings) -> TestGateway {
        let gateway = Gateway::bind(settings).await.expect("gateway binds");
        let addr = gateway.local_addr();
        let admin = gateway.admin_addr();
        let egress = gateway.egress_addr();
        let reloader = gateway.reloader();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(async move {
            let _ = rx.await;
        }));
        TestGateway {
            addr,
            admin,
            egress,
            reloader,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// Starts a gateway from `settings`, sends one `GET /metadata` as the BaRS proxy, and returns the
/// answer (the gateway stops when this returns).
pub async fn metadata_through(settings: Settings, pki: &TestPki) -> Reply2 {
    let gateway = TestGateway::start(settings).await;
    send(
        gateway.addr,
        pki.client_config(Some(ClientCert::Proxy)),
        metadata(),
    )
    .await
    .expect("request completes")
}

/// A gateway in front of a fresh counting upstream, with the standard PKI and config.
pub struct Rig {
    pub pki: TestPki,
    pub upstream: TestUpstream,
    pub gateway: TestGateway,
}

impl Rig {
    /// Standard rig.
    pub async fn start() -> Rig {
        Rig::start_with(|_| {}).await
    }

    /// Standard rig with the settings adjusted before start.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Rig {
        let pki = TestPki::new();
        let upstream = TestUpstream::start().await;
        let mut settings = pki.settings(&pki.config_toml(&upstream.url()));
        adjust(&mut settings);
        let gateway = TestGateway::start(settings).await;
        Rig {
            pki,
            upstream,
            gateway,
        }
    }

    /// Sends one request with the BaRS proxy's client certificate over a new connection.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply2 {
        send(
            self.gateway.addr,
            self.pki.client_config(Some(ClientCert::Proxy)),
            request,
        )
        .await
        .expect("request completes")
    }
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Reply2 {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply2 {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// Asserts this is a BaRS OperationOutcome with the given status and codes, ids echoed.
    pub fn assert_outcome(&self, status: u16, code: &str, issue_code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.headers["content-type"], "application/fhir+json");
        let oo = self.json();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["code"], issue_code);
        let coding = &oo["issue"][0]["details"]["coding"][0];
        assert_eq!(
            coding["system"],
            "https://fhir.nhs.uk/CodeSystem/http-error-codes"
        );
        assert_eq!(coding["code"], code);
        assert_eq!(coding["display"], format!("{status} - {code}"));
    }

    /// The OperationOutcome's diagnostics.
    pub fn diagnostics(&self) -> String {
        self.json()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// The value of the first `<name value="..."/>` in a FHIR XML document (`&amp;` unescaped).
pub fn fhir_xml_value(xml: &str, name: &str) -> String {
    let start = format!("<{name} value=\"");
    let at = xml
        .find(&start)
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
        + start.len();
    let end = xml[at..].find('"').unwrap();
    xml[at..at + end].replace("&amp;", "&")
}

/// Sends one request over a new TLS connection. Errors (refused handshakes) come back as text.
pub async fn send(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: Request<Full<Bytes>>,
) -> Result<Reply2, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    send_on(tcp, config, request).await
}

/// Opens a kept-alive HTTP/1.1 connection over TLS (the connection task runs in the background).
pub async fn connect_http1<B>(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends one request over TLS on an already connected stream.
pub async fn send_on(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    request: Request<Full<Bytes>>,
) -> Result<Reply2, String> {
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
        .await
        .map_err(|_| "no response in 20s".to_string())?
        .map_err(|e| {
            format!(
                "request: {e}: {:?}",
                std::error::Error::source(&e).map(|s| s.to_string())
            )
        })?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply2 {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A plain HTTP GET to the admin listener, returning the body.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", "admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// A plain HTTP GET to the admin listener: (status, content type, body).
pub async fn admin_request(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", "admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The example header set of `tests/fixtures/bars-examples/headers-examples.json`.
pub fn example_headers() -> serde_json::Value {
    let text = include_str!("../fixtures/bars-examples/headers-examples.json");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["valid_process_message_request"]["headers"].clone()
}

/// A valid BaRS request (every header of the example set, fresh X-Request-Id) for `method path`.
pub fn bars_request(method: &str, path: &str, body: impl Into<Bytes>) -> http::request::Builder {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (name, value) in example_headers().as_object().unwrap() {
        if name == "X-Request-Id" {
            continue;
        }
        builder = builder.header(name.as_str(), value.as_str().unwrap());
    }
    let _ = body;
    builder.header("X-Request-Id", uuid::Uuid::new_v4().to_string())
}

/// A valid `POST /$process-message` with the 35 KB validation example body.
pub fn process_message() -> Request<Full<Bytes>> {
    let body = Bytes::from_static(include_bytes!(
        "../fixtures/bars-examples/process-message-validation-request.json"
    ));
    bars_request("POST", "/$process-message", body.clone())
        .body(Full::new(body))
        .unwrap()
}

/// A valid `GET /metadata`.
pub fn metadata() -> Request<Full<Bytes>> {
    bars_request("GET", "/metadata", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------

/// A real `redis-server` on a free loopback port, killed on drop. `None` (with a loud message)
/// when redis-server is not on PATH; CI installs it, and fails the test if it is missing.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits until it answers PING. The port is a free one picked just before
    /// the server binds it; when another test takes it in between, the server exits and it is
    /// started again on another port.
    pub async fn start() -> Option<RedisServer> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            skip(
                "this Redis test",
                "redis-server is not on PATH (apt-get install redis-server)",
            );
            return None;
        }
        let mut server = RedisServer {
            port: 0,
            child: None,
            _dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..5 {
            server.port = free_port();
            server.spawn();
            if server.answers_or_exits().await {
                return Some(server);
            }
            server.stop();
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// True once the server answers PING; false if it exited first (its port was taken).
    async fn answers_or_exits(&mut self) -> bool {
        for _ in 0..500 {
            if self.answers_ping().await {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn answers_ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let _ = s.write_all(b"PING\r\n").await;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n"
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self._dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until the server answers PING (its readiness signal), up to 10 s.
    pub async fn wait_ready(&self) {
        for _ in 0..500 {
            if self.answers_ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not become ready");
    }

    /// Stops the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SHA-256 (hex) of the certificate the gateway serves on a new handshake.
pub async fn served_certificate(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    bars_gateway::tls::inspect::CertSummary::from_der(&leaf)
        .unwrap()
        .sha256_hex()
}

// --- The real binary -------------------------------------------------------------------------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `bars-gateway run` child process, killed when dropped (so a failing test leaves none behind).
pub struct GatewayProcess(pub std::process::Child);

impl std::ops::Deref for GatewayProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for GatewayProcess {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // Already reaped by a test's wait(): kill fails harmlessly.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bars-gateway run` on a free port with info logs; returns the child, its port and a
/// channel of its stderr lines.
pub fn spawn_gateway(
    pki: &TestPki,
    upstream_url: &str,
) -> (GatewayProcess, u16, std::sync::mpsc::Receiver<String>) {
    spawn_gateway_with(pki, upstream_url, |toml| toml)
}

/// Like [`spawn_gateway`], with the config text adjusted by `edit` before start.
pub fn spawn_gateway_with(
    pki: &TestPki,
    upstream_url: &str,
    edit: impl FnOnce(String) -> String,
) -> (GatewayProcess, u16, std::sync::mpsc::Receiver<String>) {
    let port = free_port();
    let toml = pki
        .config_toml(upstream_url)
        .replace(
            "address = \"127.0.0.1:0\"\nheader_read_timeout",
            &format!("address = \"127.0.0.1:{port}\"\nheader_read_timeout"),
        )
        .replace("level = \"warn\"", "level = \"info\"");
    std::fs::write(pki.path("config.toml"), edit(toml)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bars-gateway"))
        .args(["run", "--config", pki.path("config.toml").to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            eprintln!("gateway: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (GatewayProcess(child), port, rx)
}

/// Waits (up to 20 s) for a stderr line containing `text`.
pub fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the gateway exited before logging {text:?}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("no log line containing {text:?} within 20 s")
            }
        }
    }
}

pub fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------

pub mod legacy;
pub mod raw_h2;
pub mod raw_http;

/// The value of one `/metrics` series of a gateway's admin listener (`name{labels}` exactly as
/// exposed), 0 when absent.
pub async fn metric_of(admin: SocketAddr, series: &str) -> f64 {
    let prefix = format!("{series} ");
    admin_get(admin, "/metrics")
        .await
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Polls a metric until `done` (metrics have no push signal); panics after 20 s.
pub async fn wait_for_metric_of(
    admin: SocketAddr,
    series: &str,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = metric_of(admin, series).await;
        if done(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stuck at {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `done()`, re-checked each time `signal` is notified (no polling).
pub async fn wait_until(signal: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

/// Asserts an XML OperationOutcome with `status` and BaRS `code`; returns the diagnostics.
pub fn assert_xml_outcome(reply: &Reply2, status: u16, code: &str, issue: &str) -> String {
    let xml = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status.as_u16(), status, "{xml}");
    assert_eq!(
        reply.headers["content-type"], "application/fhir+xml",
        "{xml}"
    );
    assert!(
        xml.starts_with(r#"<?xml version="1.0" encoding="UTF-8"?><OperationOutcome xmlns="http://hl7.org/fhir">"#),
        "{xml}"
    );
    assert_eq!(fhir_xml_value(&xml, "code"), issue, "{xml}");
    // The second <code> is the coding's.
    let coding = &xml[xml.find("<coding>").unwrap()..];
    assert_eq!(fhir_xml_value(coding, "code"), code);
    assert_eq!(
        fhir_xml_value(coding, "system"),
        "https://fhir.nhs.uk/CodeSystem/http-error-codes"
    );
    assert_eq!(
        fhir_xml_value(coding, "display"),
        format!("{status} - {code}")
    );
    fhir_xml_value(&xml, "diagnostics")
}

/// Polls `/readyz` (computed in the background every 2 s) until `done` holds for its JSON body,
/// up to 15 s; returns (status, body).
pub async fn readyz_until(
    admin: SocketAddr,
    done: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let mut last = (0, serde_json::Value::Null);
    for _ in 0..150 {
        let (status, content_type, body) = admin_request(admin, "/readyz").await;
        assert_eq!(content_type, "application/json");
        let json: serde_json::Value = serde_json::from_str(&body).expect("/readyz is JSON");
        if done(status, &json) {
            return (status, json);
        }
        last = (status, json);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never reached the expected state; last: {last:?}");
}
