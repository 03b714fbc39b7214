//! The pipeline (DESIGN.md §1), top to bottom: what happens to one connection, then to one request.
//! Each step is one call into the module that owns it; this file is the order, not the rules.
//!
//! ```text
//! accept ─► admission (PROXY header, IP allowlist) ─► TLS-MA handshake ─► HTTP/1.1 or h2
//!   request ─► route ─► ids ─► identity headers ─► Accept ─► upstream choice ─► forward ─► response
//! ```
//! A refusal at any step becomes an OperationOutcome in `refusal_response`, the only place that
//! builds one, and every response echoes X-Request-Id and X-Correlation-Id.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admission::{self, AdmissionPolicy, RefusalLogLimiter};
use crate::bars::routes::RouteTable;
use crate::bars::{self, Refusal};
use crate::config::{BarsSettings, DedupSettings, ListenSettings, OnStoreError};
use crate::dedup::{self, Claim, DedupStore, Entry, Fingerprint, Replay};
use crate::idle::{ActivityIo, Expiry, IdleWatch};
use crate::metrics::{Metrics, OutcomeLabel, StatusLabel};
use crate::tls::{self, LoadedTls};
use crate::upstream::{BufferedBody, ForwardedHeaders, GatewayBody, Upstream, Upstreams};

/// How far past `listen.max_header_bytes` hyper still reads a header section, so that the gateway
/// can answer it as a BaRS refusal; beyond that hyper answers 431 itself.
const HEADER_SLACK: usize = 16 * 1024;

/// The header that carries the request id (BaRS).
pub const X_REQUEST_ID: &str = "x-request-id";
/// The header that carries the correlation id (BaRS).
pub const X_CORRELATION_ID: &str = "x-correlation-id";

/// What a reload replaces: TLS material and the admission lists, swapped atomically.
#[derive(Debug)]
pub struct LiveState {
    /// The TLS configuration handshakes use.
    pub tls: LoadedTls,
    /// The admission policy connections are checked against.
    pub admission: AdmissionPolicy,
}

/// Everything connection and request handling reads; built once at start.
pub struct Shared {
    /// Reloadable state; each handshake reads the current one.
    pub live: ArcSwap<LiveState>,
    /// The approved paths.
    pub routes: RouteTable,
    /// The legacy receivers.
    pub upstreams: Upstreams,
    /// BaRS rules.
    pub bars: BarsSettings,
    /// The retry dedup store.
    pub dedup: Arc<DedupStore>,
    /// Which methods are deduplicated and what a store failure means.
    pub dedup_settings: DedupSettings,
    /// Connection limits.
    pub listen: ListenSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Keeps refused-address logs to one line per address per minute.
    pub refusal_log: RefusalLogLimiter,
    /// Whether to write one audit record per request.
    pub audit: bool,
    /// HTTP server settings, built once from `[listen]`.
    pub http: auto::Builder<TokioExecutor>,
}

impl Shared {
    /// Builds the HTTP/1.1 + h2 server settings from `[listen]`.
    pub fn http_builder(listen: &ListenSettings) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // A backstop only: hyper's timer also runs while a kept-alive connection waits for its
            // next request, so it must not be shorter than idle_timeout (see idle.rs).
            .header_read_timeout(listen.idle_timeout.max(listen.header_read_timeout))
            // Slack above the limit, so that the pipeline (not hyper, with a bare 431) refuses a
            // header section a little over it: with an OperationOutcome and the ids echoed.
            .max_buf_size(listen.max_header_bytes + HEADER_SLACK)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size((listen.max_header_bytes + HEADER_SLACK) as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        builder
    }
}

/// One admitted, authenticated connection.
struct Connection {
    client: SocketAddr,
    identity: tls::ClientIdentity,
    forwarded_for: HeaderValue,
    cert_subject: Option<HeaderValue>,
    cert_sha256: Option<HeaderValue>,
}

/// Serves one accepted TCP connection to the end. `shutdown` turns true when the gateway drains.
pub async fn serve_connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let live = shared.live.load_full();

    // 1. Admission: PROXY header from trusted balancers, then the IP allowlist, before any TLS byte.
    let admitted = match admission::admit_peer(&mut stream, peer, &live.admission).await {
        Ok(admitted) => admitted,
        Err(e) => {
            shared.metrics.reject(e.reason());
            shared.refusal_log.log_refusal(peer, &e);
            return;
        }
    };

    // 2. TLS-MA handshake with the current configuration; the verifier logs certificate refusals.
    let acceptor = TlsAcceptor::from(live.tls.server_config.clone());
    let client_verifier = live.tls.client_verifier.clone();
    drop(live);
    let tls_stream = match tokio::time::timeout(
        shared.listen.header_read_timeout,
        acceptor.accept(stream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            shared
                .metrics
                .tls_handshake_failures
                .get_or_create(&crate::metrics::ReasonLabel { reason })
                .inc();
            // Certificate refusals were logged by the verifier; the rest (scanners, balancer
            // health checks that connect and close) at most once a minute per address.
            if reason != "bad_certificate"
                && shared
                    .refusal_log
                    .should_log(admitted.client.ip(), Instant::now())
            {
                tracing::info!(client = %admitted.client, reason, error = %e, "TLS handshake failed");
            }
            return;
        }
        Err(_) => {
            shared
                .metrics
                .tls_handshake_failures
                .get_or_create(&crate::metrics::ReasonLabel { reason: "timeout" })
                .inc();
            tracing::info!(client = %admitted.client, "TLS handshake timed out");
            return;
        }
    };

    // 3. A resumed session's client certificate checked again (it may have expired since), then
    // the verified client identity, passed to the legacy receiver with every request.
    if tls::recheck_resumed(tls_stream.get_ref().1, &client_verifier).is_err() {
        shared
            .metrics
            .tls_handshake_failures
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: "bad_certificate",
            })
            .inc();
        return;
    }
    let Some(identity) = tls::client_identity(tls_stream.get_ref().1) else {
        shared.metrics.reject("no_client_certificate");
        return;
    };
    shared.metrics.tls_handshakes.inc();
    let conn = Arc::new(Connection {
        client: admitted.client,
        forwarded_for: header_value(&admitted.client.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown")),
        cert_subject: HeaderValue::from_bytes(identity.subject.as_bytes()).ok(),
        cert_sha256: header_value(&identity.sha256_hex),
        identity,
    });

    // 4. HTTP/1.1 or h2 (ALPN) until the client closes, the connection idles out, or we drain.
    // The header timer runs on HTTP/1 only: on h2, pings and window updates arrive between requests.
    let is_h2 = tls_stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
    let idle = IdleWatch::new(
        shared.listen.idle_timeout,
        (!is_h2).then_some(shared.listen.header_read_timeout),
    );
    let io = TokioIo::new(ActivityIo::new(tls_stream, idle.clone()));
    let service = {
        let shared = shared.clone();
        let idle = idle.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let conn = conn.clone();
            let busy = idle.busy();
            async move {
                let response = handle_request(&shared, &conn, req).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let http = shared.http.clone();
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            expiry = idle.expired() => {
                if expiry == Expiry::HeaderTimeout {
                    shared.metrics.reject("header_timeout");
                    tracing::info!(client = %admitted.client, "request header section not received in time; closing");
                    break;
                }
                if closing {
                    // Asked to close and still stuck a whole idle timeout later: a client that
                    // stopped reading (or an h2 peer that never opens its window) would otherwise
                    // hold the connection and its max_connections slot for ever.
                    tracing::info!(client = %admitted.client, "dropping a stalled connection");
                    break;
                }
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = crate::drained(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls_err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls_err {
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_) => "invalid_message",
        _ => "other",
    }
}

/// Handles one request: runs the checks, forwards or refuses, echoes the ids, counts and audits.
async fn handle_request(
    shared: &Arc<Shared>,
    conn: &Connection,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let echo = EchoIds::from_headers(request.headers());
    let mut audit = AuditRecord::new(conn, &request);
    let mut response = match check_and_forward(shared, conn, request, &mut audit).await {
        Ok(response) => response,
        Err(refusal) => {
            shared.metrics.reject(refusal.reason());
            audit.refusal = Some(refusal.clone());
            refusal_response(&refusal)
        }
    };
    echo.apply(response.headers_mut());
    let status = response.status();
    shared
        .metrics
        .requests
        .get_or_create(&StatusLabel {
            status: status.as_u16(),
        })
        .inc();
    audit.finish(shared.audit, status.as_u16(), started.elapsed());
    response
}

/// The request checks of DESIGN.md §1, in order; the first failure wins.
async fn check_and_forward(
    shared: &Arc<Shared>,
    conn: &Connection,
    request: Request<Incoming>,
    audit: &mut AuditRecord<'_>,
) -> Result<Response<GatewayBody>, Refusal> {
    // Size: the header section within listen.max_header_bytes (431).
    check_header_section(&request, shared.listen.max_header_bytes)?;

    // Route: a known method and path under the BaRS base path (404 / 405 / 400 for unsafe paths).
    let route = shared
        .routes
        .resolve(request.method(), request.uri(), request.version())?;
    audit.endpoint = Some(route.endpoint.name());

    // Ids: X-Request-Id and X-Correlation-Id present and UUIDs (400).
    let ids = bars::ids::read_request_ids(request.headers())?;
    audit.request_id = Some(ids.request_id);
    audit.correlation_id = Some(ids.correlation_id);

    // Identity headers: NHSD-* decoded and validated, required per endpoint (400).
    let identity = bars::identity::decode_identity_headers(
        request.headers(),
        route
            .endpoint
            .identity_requirements(shared.bars.require_identity_headers),
    )?;
    audit.target = identity.target.as_ref().map(|t| t.to_string());
    audit.ods_code = identity.organisation.as_ref().map(|o| o.ods_code.0.clone());
    audit.software = identity.software.as_ref().and_then(|s| s.id.clone());

    // Accept: the major version asked for is served (406).
    bars::accept::check_accept(request.headers(), &shared.bars.accepted_major_versions)?;

    // Upstream: by NHSD-Target-Identifier, else the default (404 when none serves the target).
    let upstream = shared.upstreams.select(identity.target.as_ref())?;

    let added = ForwardedHeaders {
        forwarded_for: conn.forwarded_for.clone(),
        cert_subject: conn.cert_subject.clone(),
        cert_sha256: conn.cert_sha256.clone(),
        bars_target: audit.target.as_deref().and_then(header_value),
        ods_code: audit.ods_code.as_deref().and_then(header_value),
    };
    let (parts, body) = request.into_parts();

    // Methods that are not deduplicated (reads) stream straight through (408 / 413 / 503).
    if !shared.dedup_settings.methods.contains(&parts.method) {
        let body = shared.upstreams.streaming_body(&parts.headers, body)?;
        let (result, elapsed) =
            timed_forward(shared, upstream, parts, body, &route.path_and_query, &added).await;
        audit.upstream_duration = Some(elapsed);
        return result;
    }

    // Dedup: after access control, before processing (BaRS IG). The body is read (bounded by
    // max_body, 413) because it is part of what makes a retry "the same message".
    let body = shared.upstreams.buffered_body(&parts.headers, body).await?;
    let fingerprint =
        Fingerprint::of_chunks(&parts.method, &parts.uri, &parts.headers, &body.chunks);
    // Claim, forward and record run in their own task: a client that disconnects mid-request
    // must leave its id recorded as what really happened upstream, never half-done.
    let task = tokio::spawn(forward_once(
        shared.clone(),
        upstream.clone(),
        ids.request_id,
        fingerprint,
        parts,
        body,
        route.path_and_query,
        added,
    ));
    let outcome = task.await.map_err(|e| {
        tracing::error!(error = %e, "forwarding task failed");
        Refusal::Internal
    })?;
    audit.dedup = Some(outcome.dedup);
    audit.upstream_duration = outcome.upstream_duration;
    outcome.response
}

/// Forwards and measures the time to the upstream's response headers.
async fn timed_forward(
    shared: &Shared,
    upstream: &Upstream,
    parts: http::request::Parts,
    body: GatewayBody,
    path_and_query: &str,
    added: &ForwardedHeaders,
) -> (Result<Response<GatewayBody>, Refusal>, Duration) {
    let started = Instant::now();
    let result = shared
        .upstreams
        .forward(upstream, parts, body, path_and_query, added)
        .await;
    let elapsed = started.elapsed();
    shared
        .metrics
        .upstream_duration
        .observe(elapsed.as_secs_f64());
    (result, elapsed)
}

/// What the dedup step decided, for the response, the metrics and the audit record.
struct ForwardOutcome {
    response: Result<Response<GatewayBody>, Refusal>,
    dedup: &'static str,
    upstream_duration: Option<Duration>,
}

impl ForwardOutcome {
    fn answered_here(
        response: Result<Response<GatewayBody>, Refusal>,
        dedup: &'static str,
    ) -> Self {
        ForwardOutcome {
            response,
            dedup,
            upstream_duration: None,
        }
    }
}

/// The dedup step (DESIGN.md §5): claim the request id, then forward a first sight and record
/// what the upstream answered, or answer a retry here without troubling the upstream.
#[allow(clippy::too_many_arguments)]
async fn forward_once(
    shared: Arc<Shared>,
    upstream: Arc<Upstream>,
    id: bars::ids::RequestId,
    fingerprint: Fingerprint,
    parts: http::request::Parts,
    body: BufferedBody,
    path_and_query: String,
    added: ForwardedHeaders,
) -> ForwardOutcome {
    let count = |outcome: &'static str| {
        shared
            .metrics
            .dedup
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        outcome
    };
    let record = match shared.dedup.claim(id, fingerprint).await {
        Ok(Claim::First) => true,
        Ok(Claim::Seen(Entry::InFlight { .. })) => {
            return ForwardOutcome::answered_here(Err(Refusal::InFlight), count("in_flight"))
        }
        Ok(Claim::Seen(Entry::Done {
            status,
            reference,
            replay,
            ..
        })) => {
            if (200..300).contains(&status) {
                let reference = reference.map(String::from);
                return ForwardOutcome::answered_here(
                    Err(Refusal::Duplicate { reference }),
                    count("duplicate"),
                );
            }
            return ForwardOutcome::answered_here(
                Ok(replay_response(status, replay)),
                count("replayed"),
            );
        }
        Ok(Claim::Conflict) => {
            return ForwardOutcome::answered_here(Err(Refusal::IdReused), count("id_reused"))
        }
        Err(e) => match shared.dedup_settings.on_store_error {
            OnStoreError::Reject => {
                tracing::warn!(request_id = %id, error = %e, "dedup store unavailable: refusing with 503 so the sender retries");
                return ForwardOutcome::answered_here(
                    Err(Refusal::StoreUnavailable),
                    count("store_error"),
                );
            }
            OnStoreError::Allow => {
                tracing::error!(request_id = %id, error = %e, "dedup store unavailable: forwarding WITHOUT duplicate protection (dedup.on_store_error = allow)");
                count("store_error");
                false
            }
        },
    };
    let (result, elapsed) = timed_forward(
        &shared,
        &upstream,
        parts,
        body.into_body(),
        &path_and_query,
        &added,
    )
    .await;
    let mut outcome = ForwardOutcome {
        response: result,
        dedup: if record { "first" } else { "unprotected" },
        upstream_duration: Some(elapsed),
    };
    if !record {
        return outcome;
    }
    count("first");
    let deterministic =
        matches!(&outcome.response, Ok(r) if dedup::is_deterministic(r.status().as_u16()));
    if !deterministic {
        // Transient (408, 429, 5xx, timeout, unreachable): forget, so the sender's retry goes through.
        if let Err(e) = shared.dedup.release(id).await {
            tracing::error!(request_id = %id, error = %e, "dedup store: could not release a failed request; its retries get 425 until the in-flight entry expires");
        }
        return outcome;
    }
    let Ok(response) = outcome.response else {
        return outcome;
    };
    let (response, entry) = remember(response, fingerprint).await;
    if let Err(e) = shared.dedup.complete(id, entry).await {
        tracing::error!(request_id = %id, error = %e, "dedup store: could not record a processed request; a retry after the in-flight entry expires would be delivered again");
    }
    outcome.response = Ok(response);
    outcome
}

/// Builds the store entry for a deterministic answer; for a 4xx with a small body, keeps the body
/// to replay it (and hands back an equivalent response).
async fn remember(
    response: Response<GatewayBody>,
    fingerprint: Fingerprint,
) -> (Response<GatewayBody>, Entry) {
    let status = response.status().as_u16();
    let reference = response
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(|l| l.rsplit('/').find(|s| !s.is_empty()).unwrap_or(l).into());
    let mut replay = None;
    let mut response = response;
    let small = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|len| len <= dedup::MAX_REPLAY_BODY);
    if (400..500).contains(&status) {
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        if small {
            let (parts, incoming) = response.into_parts();
            let bytes = incoming
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            body = bytes.to_vec();
            response = Response::from_parts(
                parts,
                Full::new(bytes)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
        }
        replay = Some(Box::new(Replay { content_type, body }));
    }
    (
        response,
        Entry::Done {
            fingerprint,
            status,
            reference,
            replay,
        },
    )
}

/// The original deterministic 4xx answer, again.
fn replay_response(status: u16, replay: Option<Box<Replay>>) -> Response<GatewayBody> {
    let (content_type, body) = match replay {
        Some(r) => (r.content_type, r.body),
        None => (None, Vec::new()),
    };
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
    if let Some(ct) = content_type.as_deref().and_then(header_value) {
        response.headers_mut().insert(CONTENT_TYPE, ct);
    }
    response
}

/// Refuses a request whose header section (request line and fields, as HTTP/1.1 would write
/// them) is larger than `limit`.
fn check_header_section(request: &Request<Incoming>, limit: usize) -> Result<(), Refusal> {
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + 12;
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if line + fields > limit {
        return Err(Refusal::HeadersTooLarge { limit });
    }
    Ok(())
}

/// Renders a refusal as the HTTP response the client gets: the one place that does.
pub fn refusal_response(refusal: &Refusal) -> Response<GatewayBody> {
    let body = serde_json::to_vec(&refusal.to_operation_outcome()).unwrap_or_default();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = refusal.status();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    if let Some(allow) = refusal.allow().and_then(header_value) {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}

fn header_value(text: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(text).ok()
}

/// The request's ids as sent, echoed on every response (senders retry when they are missing).
struct EchoIds {
    request_id: Option<HeaderValue>,
    correlation_id: Option<HeaderValue>,
}

impl EchoIds {
    fn from_headers(headers: &HeaderMap) -> EchoIds {
        EchoIds {
            request_id: headers.get(X_REQUEST_ID).cloned(),
            correlation_id: headers.get(X_CORRELATION_ID).cloned(),
        }
    }

    fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in [
            (X_REQUEST_ID, self.request_id),
            (X_CORRELATION_ID, self.correlation_id),
        ] {
            match value {
                Some(v) => {
                    headers.insert(name, v);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
    }
}

/// One audit record per request (log target `audit`): who, what, outcome. Never bodies, never
/// decoded data beyond the identifiers listed here.
struct AuditRecord<'c> {
    conn: &'c Connection,
    method: http::Method,
    uri: http::Uri,
    endpoint: Option<&'static str>,
    request_id: Option<bars::ids::RequestId>,
    correlation_id: Option<bars::ids::CorrelationId>,
    target: Option<String>,
    ods_code: Option<String>,
    software: Option<String>,
    refusal: Option<Refusal>,
    dedup: Option<&'static str>,
    upstream_duration: Option<Duration>,
}

/// Displays an optional value, or `-` when absent (audit fields are always present).
struct OrDash<'a, T>(&'a Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl<'c> AuditRecord<'c> {
    /// Cheap: borrows the connection, clones only the method and URI (reference-counted); nothing
    /// is formatted unless a log line is written.
    fn new(conn: &'c Connection, request: &Request<Incoming>) -> AuditRecord<'c> {
        AuditRecord {
            conn,
            method: request.method().clone(),
            uri: request.uri().clone(),
            endpoint: None,
            request_id: None,
            correlation_id: None,
            target: None,
            ods_code: None,
            software: None,
            refusal: None,
            dedup: None,
            upstream_duration: None,
        }
    }

    fn finish(self, audit: bool, status: u16, total: Duration) {
        let bars_code = self.refusal.as_ref().map(Refusal::bars_code);
        let diagnostics = self.refusal.as_ref().map(|r| r.to_string());
        if !audit {
            if let Some(refusal) = &self.refusal {
                tracing::info!(
                    client = %self.conn.client.ip(),
                    request_id = %OrDash(&self.request_id),
                    correlation_id = %OrDash(&self.correlation_id),
                    status,
                    reason = refusal.reason(),
                    diagnostics = diagnostics.as_deref().unwrap_or(""),
                    "request refused"
                );
            }
            return;
        }
        tracing::info!(
            target: "audit",
            client = %self.conn.client.ip(),
            cert_subject = %self.conn.identity.subject,
            cert_sha256 = %self.conn.identity.sha256_hex,
            method = %self.method,
            path = %self.uri.path(),
            endpoint = self.endpoint.unwrap_or("-"),
            request_id = %OrDash(&self.request_id),
            correlation_id = %OrDash(&self.correlation_id),
            bars_target = self.target.as_deref().unwrap_or("-"),
            ods_code = self.ods_code.as_deref().unwrap_or("-"),
            software = self.software.as_deref().unwrap_or("-"),
            status,
            bars_code = bars_code.unwrap_or("-"),
            diagnostics = diagnostics.as_deref().unwrap_or(""),
            dedup = self.dedup.unwrap_or("-"),
            upstream_ms = self.upstream_duration.map(|d| d.as_millis() as u64),
            total_ms = total.as_millis() as u64,
            "request"
        );
    }
}
