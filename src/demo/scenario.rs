//! The demo's scenario: a handful of real BaRS requests over TLS-MA, each with the outcome a
//! conformant receiver must give, and the table that compares expectation and result.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::pki::DemoPki;
use super::receiver::SampleReceiver;
use super::DemoError;

/// The example header set (`valid_process_message_request.headers`) and the invalid cases.
pub const HEADERS_EXAMPLES: &str =
    include_str!("../../tests/fixtures/bars-examples/headers-examples.json");
/// The 35 KB `$process-message` validation request body.
pub const PROCESS_MESSAGE_BODY: &[u8] =
    include_bytes!("../../tests/fixtures/bars-examples/process-message-validation-request.json");
/// The NHSD-Target-Identifier the BaRS proxy's own tests use for "not Base64".
pub const NOT_BASE64_TARGET: &str = "this-is-not-base-64";

/// How long one exchange (connect, handshake, request, response) may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a step should get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// An HTTP response with this status and, for a refusal, this BaRS code.
    Status {
        /// The HTTP status.
        status: u16,
        /// The OperationOutcome's `details.coding[0].code`, if the answer is a refusal.
        code: Option<&'static str>,
    },
    /// The TLS handshake is refused: no HTTP response at all.
    HandshakeRefused,
}

/// What a step got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// An HTTP response.
    Response {
        /// The HTTP status.
        status: u16,
        /// The BaRS code, when the body is an OperationOutcome.
        code: Option<String>,
    },
    /// A TLS connection was attempted but no HTTP response came back.
    NoResponse {
        /// The TLS alert the gateway sent, e.g. `UnknownCA`, if one was received.
        alert: Option<String>,
        /// The client-side error.
        detail: String,
    },
    /// The request could not even be attempted (no TCP connection) or timed out.
    Failed(String),
}

/// One request of the scenario.
#[derive(Debug, Clone)]
pub struct Step {
    /// `a`, `b`, ...
    pub label: char,
    /// What was sent, in a few words.
    pub sent: String,
    /// The outcome a conformant receiver gives.
    pub expected: Expected,
    /// Whether the legacy receiver should see it.
    pub reaches_receiver: bool,
}

/// A step and what happened.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// The step.
    pub step: Step,
    /// What the client got.
    pub got: Got,
    /// Whether the legacy receiver got a request during the step.
    pub receiver_saw_it: bool,
}

impl StepResult {
    /// Whether the answer and the receiver's involvement are as expected.
    pub fn as_expected(&self) -> bool {
        let answer_ok = match (&self.step.expected, &self.got) {
            (Expected::Status { status, code }, Got::Response { status: s, code: c }) => {
                status == s && code.map(str::to_string) == *c
            }
            (Expected::HandshakeRefused, Got::NoResponse { .. }) => true,
            _ => false,
        };
        answer_ok && self.receiver_saw_it == self.step.reaches_receiver
    }
}

/// Where to send and with which certificates.
pub struct Target {
    addr: SocketAddr,
    trusted: Arc<rustls::ClientConfig>,
    untrusted: Arc<rustls::ClientConfig>,
}

impl Target {
    /// A client of the gateway at `addr`, trusting the demo root, with either demo client
    /// certificate, read from the PEM files (as `curl` would).
    pub fn new(addr: SocketAddr, pki: &DemoPki) -> Result<Target, DemoError> {
        Ok(Target {
            addr,
            trusted: client_config(pki, &pki.client_cert, &pki.client_key)?,
            untrusted: client_config(pki, &pki.untrusted_client_cert, &pki.untrusted_client_key)?,
        })
    }
}

/// A TLS-MA client config trusting the demo root and presenting `cert` (also the stand-in
/// platform's relay in `sender`).
pub(crate) fn client_config(
    pki: &DemoPki,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, DemoError> {
    let mut roots = rustls::RootCertStore::empty();
    let root = CertificateDer::from_pem_file(&pki.root)
        .map_err(|e| DemoError::new(format!("cannot read {}", pki.root.display()), e))?;
    roots
        .add(root)
        .map_err(|e| DemoError::new(format!("cannot trust {}", pki.root.display()), e))?;
    let chain = vec![CertificateDer::from_pem_file(cert)
        .map_err(|e| DemoError::new(format!("cannot read {}", cert.display()), e))?];
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| DemoError::new(format!("cannot read {}", key.display()), e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DemoError::new("cannot configure TLS", e))?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| DemoError::new("cannot use the demo client certificate", e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The order headers are listed in, as the BaRS specification lists them (the JSON map itself is
/// read back sorted by name).
const HEADER_ORDER: [&str; 9] = [
    "Content-Type",
    "Accept",
    "X-Request-Id",
    "X-Correlation-Id",
    "NHSD-Target-Identifier",
    "NHSD-End-User-Organisation",
    "NHSD-Requesting-Software",
    "NHSD-Requesting-Practitioner",
    "use-context",
];

/// The example header set of `headers-examples.json` (`valid_process_message_request.headers`).
pub fn example_headers() -> Result<Vec<(String, String)>, DemoError> {
    let examples: serde_json::Value = serde_json::from_str(HEADERS_EXAMPLES)
        .map_err(|e| DemoError::new("the embedded headers-examples.json", e))?;
    let headers = examples["valid_process_message_request"]["headers"]
        .as_object()
        .ok_or_else(|| {
            DemoError::msg(
                "the embedded headers-examples.json has no valid_process_message_request.headers",
            )
        })?;
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(name, value)| (name.clone(), value.as_str().unwrap_or_default().to_string()))
        .collect();
    headers.sort_by_key(|(name, _)| {
        HEADER_ORDER
            .iter()
            .position(|known| known.eq_ignore_ascii_case(name))
            .unwrap_or(HEADER_ORDER.len())
    });
    Ok(headers)
}

/// The example header set with `X-Request-Id` and any `overrides` replaced.
pub fn headers_with(
    request_id: &str,
    overrides: &[(&str, &str)],
) -> Result<Vec<(String, String)>, DemoError> {
    let mut headers = example_headers()?;
    for (name, value) in headers.iter_mut() {
        if name.eq_ignore_ascii_case("X-Request-Id") {
            *value = request_id.to_string();
        }
        if let Some((_, v)) = overrides.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            *value = v.to_string();
        }
    }
    Ok(headers)
}

fn request(
    method: &str,
    path: &str,
    addr: SocketAddr,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, DemoError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("localhost:{}", addr.port()));
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .body(Full::new(body))
        .map_err(|e| DemoError::new(format!("cannot build {method} {path}"), e))
}

/// Runs every step in order and reports what happened.
pub async fn run_scenario(
    target: &Target,
    receiver: &SampleReceiver,
) -> Result<Vec<StepResult>, DemoError> {
    let body = Bytes::from_static(PROCESS_MESSAGE_BODY);
    let original_id = uuid::Uuid::new_v4().to_string();
    let valid = headers_with(&original_id, &[])?;
    let size = format!("{} KB", body.len() / 1000);

    let steps = vec![
        (
            Step {
                label: 'a',
                sent: format!("POST /$process-message, every BaRS header, {size} body"),
                expected: Expected::Status {
                    status: 200,
                    code: None,
                },
                reaches_receiver: true,
            },
            request(
                "POST",
                "/$process-message",
                target.addr,
                &valid,
                body.clone(),
            )?,
            &target.trusted,
        ),
        (
            Step {
                label: 'b',
                sent: "the same again, same X-Request-Id (a retry)".to_string(),
                expected: Expected::Status {
                    status: 409,
                    code: Some("REC_CONFLICT"),
                },
                reaches_receiver: false,
            },
            request(
                "POST",
                "/$process-message",
                target.addr,
                &valid,
                body.clone(),
            )?,
            &target.trusted,
        ),
        (
            Step {
                label: 'c',
                sent: format!("NHSD-Target-Identifier: {NOT_BASE64_TARGET} (not Base64)"),
                expected: Expected::Status {
                    status: 400,
                    code: Some("REC_BAD_REQUEST"),
                },
                reaches_receiver: false,
            },
            request(
                "POST",
                "/$process-message",
                target.addr,
                &headers_with(
                    &uuid::Uuid::new_v4().to_string(),
                    &[("NHSD-Target-Identifier", NOT_BASE64_TARGET)],
                )?,
                body.clone(),
            )?,
            &target.trusted,
        ),
        // A GET, not the 35 KB POST: the refusal comes while the client is still writing, and
        // a large write into the closed connection can turn the alert into a bare reset.
        (
            Step {
                label: 'd',
                sent: "GET /metadata, client cert from an untrusted CA (same CN)".to_string(),
                expected: Expected::HandshakeRefused,
                reaches_receiver: false,
            },
            request(
                "GET",
                "/metadata",
                target.addr,
                &headers_with(&uuid::Uuid::new_v4().to_string(), &[])?,
                Bytes::new(),
            )?,
            &target.untrusted,
        ),
    ];

    let mut results = Vec::with_capacity(steps.len());
    for (step, request, config) in steps {
        let before = receiver.received();
        let got = exchange(target.addr, config.clone(), request).await;
        let receiver_saw_it = receiver.received() > before;
        results.push(StepResult {
            step,
            got,
            receiver_saw_it,
        });
    }
    Ok(results)
}

/// One request over a new TLS connection.
async fn exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: Request<Full<Bytes>>,
) -> Got {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| Got::Failed(format!("cannot connect to {addr}: {e}")))?;
        // "localhost" is a valid DNS name: this cannot fail.
        let name = ServerName::try_from("localhost")
            .map_err(|e| Got::Failed(format!("server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| no_response(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| no_response(&e))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| no_response(&e))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| no_response(&e))?
            .to_bytes();
        Ok::<Got, Got>(Got::Response {
            status,
            code: bars_code(&body),
        })
    };
    match tokio::time::timeout(EXCHANGE_TIMEOUT, attempt).await {
        Ok(Ok(got)) | Ok(Err(got)) => got,
        Err(_) => Got::Failed(format!("no answer within {}s", EXCHANGE_TIMEOUT.as_secs())),
    }
}

/// A failure after the TCP connection: find the TLS alert in the error chain, if any.
fn no_response(err: &(dyn std::error::Error + 'static)) -> Got {
    let mut alert = None;
    let mut texts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(rustls::Error::AlertReceived(description)) = e.downcast_ref::<rustls::Error>() {
            alert = Some(format!("{description:?}"));
        }
        texts.push(e.to_string());
        // io::Error::source() skips the error it wraps; get_ref() reaches it.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        current = wrapped.or_else(|| e.source());
    }
    // An io::Error displays as the error it wraps: say it once.
    texts.dedup();
    Got::NoResponse {
        alert,
        detail: texts.join(": "),
    }
}

/// The BaRS code of an OperationOutcome body (`issue[0].details.coding[0].code`).
fn bars_code(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    if json["resourceType"] != "OperationOutcome" {
        return None;
    }
    json["issue"][0]["details"]["coding"][0]["code"]
        .as_str()
        .map(str::to_string)
}

fn describe_expected(expected: &Expected) -> String {
    match expected {
        Expected::Status { status, code } => match code {
            Some(code) => format!("{status} {code}"),
            None => status.to_string(),
        },
        Expected::HandshakeRefused => "TLS handshake refused".to_string(),
    }
}

fn describe_got(got: &Got) -> String {
    match got {
        Got::Response { status, code } => match code {
            Some(code) => format!("{status} {code}"),
            None => status.to_string(),
        },
        Got::NoResponse {
            alert: Some(alert), ..
        } => format!("refused, TLS alert {alert}"),
        Got::NoResponse {
            alert: None,
            detail,
        } => format!("no HTTP response ({detail})"),
        Got::Failed(why) => format!("failed: {why}"),
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// The results as a table: step, what was sent, expected, got, ✔/✘, whether the legacy receiver
/// saw it; then a one-line summary.
pub fn render_table(results: &[StepResult]) -> String {
    let header = [
        "step".to_string(),
        "sent".to_string(),
        "expected".to_string(),
        "got".to_string(),
        "ok".to_string(),
        "legacy receiver saw it".to_string(),
    ];
    let rows: Vec<[String; 6]> = results
        .iter()
        .map(|r| {
            let receiver = if r.receiver_saw_it == r.step.reaches_receiver {
                yes_no(r.receiver_saw_it).to_string()
            } else {
                format!(
                    "{} (expected {})",
                    yes_no(r.receiver_saw_it),
                    yes_no(r.step.reaches_receiver)
                )
            };
            [
                format!("({})", r.step.label),
                r.step.sent.clone(),
                describe_expected(&r.step.expected),
                describe_got(&r.got),
                if r.as_expected() { "✔" } else { "✘" }.to_string(),
                receiver,
            ]
        })
        .collect();
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(rows.iter()) {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String; 6]| {
        let cells: Vec<String> = row
            .iter()
            .zip(widths.iter())
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    };
    line(&mut out, &header);
    let rule: [String; 6] = widths.map(|w| "─".repeat(w));
    line(&mut out, &rule);
    for row in &rows {
        line(&mut out, row);
    }
    let good = results.iter().filter(|r| r.as_expected()).count();
    let _ = writeln!(out, "\n  {good} of {} outcomes as expected.", results.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(expected: Expected, reaches: bool, got: Got, saw: bool) -> StepResult {
        StepResult {
            step: Step {
                label: 'x',
                sent: "test".to_string(),
                expected,
                reaches_receiver: reaches,
            },
            got,
            receiver_saw_it: saw,
        }
    }

    const CONFLICT: Expected = Expected::Status {
        status: 409,
        code: Some("REC_CONFLICT"),
    };

    #[test]
    fn a_retry_that_went_through_is_not_as_expected() {
        let got = Got::Response {
            status: 200,
            code: None,
        };
        let r = result(CONFLICT, false, got, true);
        assert!(!r.as_expected());
        let table = render_table(&[r]);
        assert!(table.contains('✘'), "{table}");
        assert!(table.contains("yes (expected no)"), "{table}");
        assert!(table.contains("0 of 1 outcomes as expected"), "{table}");
    }

    #[test]
    fn the_right_status_with_the_receiver_called_is_not_as_expected() {
        let got = Got::Response {
            status: 409,
            code: Some("REC_CONFLICT".to_string()),
        };
        assert!(result(CONFLICT.clone(), false, got.clone(), false).as_expected());
        assert!(!result(CONFLICT, false, got, true).as_expected());
    }

    #[test]
    fn a_refused_handshake_needs_a_connection_not_a_connect_failure() {
        let refused = Got::NoResponse {
            alert: Some("UnknownCA".to_string()),
            detail: String::new(),
        };
        assert!(result(Expected::HandshakeRefused, false, refused, false).as_expected());
        let failed = Got::Failed("cannot connect".to_string());
        assert!(!result(Expected::HandshakeRefused, false, failed, false).as_expected());
    }

    #[test]
    fn the_example_headers_come_in_spec_order_with_the_id_replaced() {
        let headers = headers_with("11111111-2222-4333-8444-555555555555", &[]).unwrap();
        assert_eq!(headers[0].0, "Content-Type");
        assert_eq!(
            headers[2],
            (
                "X-Request-Id".to_string(),
                "11111111-2222-4333-8444-555555555555".to_string()
            )
        );
        assert_eq!(headers.len(), HEADER_ORDER.len());
    }

    #[test]
    fn bars_code_reads_an_operation_outcome_and_nothing_else() {
        let oo = crate::bars::errors::Refusal::InFlight.to_operation_outcome();
        assert_eq!(
            bars_code(oo.to_string().as_bytes()).as_deref(),
            Some("REC_TOO_EARLY")
        );
        assert_eq!(bars_code(br#"{"resourceType":"Bundle"}"#), None);
        assert_eq!(bars_code(b"not json"), None);
    }
}
