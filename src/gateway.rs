//! The pipeline (DESIGN.md §1), top to bottom: what happens to one connection, then to one request.
//! Each step is one call into the module that owns it; this file is the order, not the rules.
//!
//! ```text
//! connection: accept (max_connections) ─► shard (the least loaded core) ─► admission (PROXY,
//!             IP allowlist) ─► TLS-MA handshake ─► HTTP/1.1 or h2
//! request:    framing (CL + TE) ─► ids ─► header size ─► route ─► identity headers ─► Accept
//!             ─► upstream choice ─► body ─┬─ read methods, streamed ───────► forward ─► response
//!                                         └─ dedup methods, buffered ─► dedup: forward once
//! ```
//! A refusal at any step becomes an OperationOutcome in the caller's format in
//! `bars::render::refusal_response`, the only place that builds one, and every response echoes
//! X-Request-Id and X-Correlation-Id.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::admission::{self, RefusalLogLimiter};
use crate::audit::{AuditRecord, Peer};
use crate::bars::headers::{CORRELATION_ID_KEY, REQUEST_ID_KEY};
use crate::bars::identity::IdentityPolicy;
use crate::bars::routes::RouteTable;
use crate::bars::warnings::WarningReporter;
use crate::bars::{self, render, Refusal};
use crate::config::{BarsSettings, DedupSettings, ListenSettings};
use crate::dedup::once::{Deliverer, Delivery};
use crate::dedup::{DedupStore, Fingerprint};
use crate::drain::drained;
use crate::framing::FramingWatch;
use crate::idle::{ActivityIo, Expiry, IdleWatch};
use crate::live::LiveState;
use crate::metrics::{Metrics, StatusLabel};
use crate::rejection::RejectionReason;
use crate::shards::Shards;
use crate::tls;
use crate::upstream::{ForwardedHeaders, GatewayBody, Upstreams};

/// How far past `listen.max_header_bytes` hyper still reads a header section, so that the gateway
/// can answer it as a BaRS refusal; beyond that hyper answers 431 itself.
const HEADER_SLACK: usize = 16 * 1024;

/// Everything connection and request handling reads; built once at start.
pub(crate) struct Shared {
    /// Reloadable state; each handshake reads the current one (the reloader swaps it).
    pub live: Arc<ArcSwap<LiveState>>,
    /// The approved paths.
    pub routes: RouteTable,
    /// The legacy receivers.
    pub upstreams: Arc<Upstreams>,
    /// Delivery of deduplicated requests: claim, forward once, record.
    pub delivery: Arc<Deliverer>,
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
    pub refusal_log: Arc<RefusalLogLimiter>,
    /// Counts identity header warnings and logs one a minute.
    pub identity_warnings: Arc<WarningReporter>,
    /// `[[upstream.route]]` entries exist: the gateway needs NHSD-Target-Identifier's value.
    pub routes_by_target: bool,
    /// Whether to write one audit record per request.
    pub audit: bool,
    /// HTTP server settings, built once from `[listen]`.
    pub http: HttpServers,
}

impl Shared {
    /// The same state with another upstream pool: what one shard serves with (`shards`).
    pub(crate) fn with_upstreams(
        &self,
        upstreams: Arc<Upstreams>,
        delivery: Arc<Deliverer>,
    ) -> Shared {
        Shared {
            live: self.live.clone(),
            routes: self.routes.clone(),
            upstreams,
            delivery,
            bars: self.bars.clone(),
            dedup: self.dedup.clone(),
            dedup_settings: self.dedup_settings.clone(),
            listen: self.listen.clone(),
            metrics: self.metrics.clone(),
            refusal_log: self.refusal_log.clone(),
            identity_warnings: self.identity_warnings.clone(),
            routes_by_target: self.routes_by_target,
            audit: self.audit,
            http: self.http.clone(),
        }
    }

    /// Builds the HTTP/1.1 + h2 server settings from `[listen]`.
    pub(crate) fn http_builder(listen: &ListenSettings) -> HttpServers {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // A backstop only: hyper's timer also runs while a kept-alive connection waits for its
            // next request, so it must not be shorter than idle_timeout (see idle.rs).
            .header_read_timeout(listen.idle_timeout.max(listen.header_read_timeout))
            // Slack above the limit, so that the pipeline (not hyper, with a bare 431) refuses a
            // header section a little over it: with an OperationOutcome and the ids echoed.
            .max_buf_size(listen.max_header_bytes + HEADER_SLACK)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size((listen.max_header_bytes + HEADER_SLACK) as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        HttpServers { http1, http2 }
    }
}

/// The HTTP servers, built once from `[listen]`: HTTP/1.1, and h2 when ALPN chose it.
#[derive(Clone)]
pub(crate) struct HttpServers {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// An HTTP/1.1 or h2 connection being served.
type ServedConnection =
    dyn GracefulConnection<Error = hyper::Error, Output = Result<(), hyper::Error>> + Send;

/// One admitted, authenticated connection.
struct Connection {
    peer: Arc<Peer>,
    /// HTTP/1 only: what hyper does not show of each request's framing.
    framing: Option<Arc<FramingWatch>>,
    forwarded_for: HeaderValue,
    cert_subject: Option<HeaderValue>,
    cert_sha256: Option<HeaderValue>,
}

/// Accepts connections until `shutdown` resolves, then closes the listener. A connection over
/// `listen.max_connections` is counted and closed at once; each other one is handed to the least
/// loaded shard and served there by [`serve_connection`], holding a clone of `alive` until it
/// ends (the caller waits for every clone to drop while draining). `drain` turns true when the
/// gateway drains.
pub(crate) async fn accept(
    shared: Arc<Shared>,
    shards: &Shards,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let limit = Arc::new(Semaphore::new(shared.listen.max_connections));
    tokio::pin!(shutdown);
    while let Some((stream, peer)) = crate::drain::accept_until(
        &listener,
        shutdown.as_mut(),
        "accept failed",
        Duration::from_millis(50),
    )
    .await
    {
        shared.metrics.connections_accepted.inc();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics.reject(RejectionReason::MaxConnections);
            if shared.refusal_log.should_log(peer.ip(), Instant::now()) {
                tracing::warn!(peer = %peer, reason = "max_connections", "connection refused");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let metrics = shared.metrics.clone();
        let alive = alive.clone();
        metrics.connections_open.inc();
        shards.serve(stream, peer, drain.clone(), move || {
            metrics.connections_open.dec();
            drop(permit);
            drop(alive);
        });
    }
    drop(listener);
}

/// Serves one accepted TCP connection to the end. `shutdown` turns true when the gateway drains.
pub(crate) async fn serve_connection(
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
            shared.metrics.reject(e.rejection());
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
            let reason = tls::errors::handshake_failure_reason(&e);
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
        shared.metrics.reject(RejectionReason::NoClientCertificate);
        return;
    };
    shared.metrics.tls_handshakes.inc();
    let is_h2 = tls_stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
    let framing = (!is_h2).then(|| Arc::new(FramingWatch::default()));
    let conn = Arc::new(Connection {
        framing: framing.clone(),
        forwarded_for: header_value(&admitted.client.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown")),
        cert_subject: HeaderValue::from_bytes(identity.subject.as_bytes()).ok(),
        cert_sha256: header_value(&identity.sha256_hex),
        peer: Arc::new(Peer {
            client: admitted.client.ip(),
            cert_subject: identity.subject,
            cert_sha256: identity.sha256_hex,
        }),
    });

    // 4. HTTP/1.1 or h2 (ALPN) until the client closes, the connection idles out, or we drain.
    // The header timer runs on HTTP/1 only: on h2, pings and window updates arrive between requests.
    let idle = IdleWatch::new(
        shared.listen.idle_timeout,
        (!is_h2).then_some(shared.listen.header_read_timeout),
    );
    let io = TokioIo::new(ActivityIo::new(tls_stream, idle.clone(), framing));
    let service = {
        let shared = shared.clone();
        let idle = idle.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let conn = conn.clone();
            let busy = idle.busy();
            // Boxed: hyper keeps a slot the size of the service's future for every connection,
            // idle ones too (3.6 kB for this pipeline); boxed, the slot is a pointer and the
            // future exists only while a request is in flight.
            let request: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                let response = handle_request(&shared, &conn, req).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            });
            request
        })
    };
    // The protocol is the one ALPN chose. hyper-util's auto-detection would read a 24-byte
    // preface first, which makes hyper grow its read buffer to 16 kB for every connection.
    let mut connection: Pin<Box<ServedConnection>> = if is_h2 {
        Box::pin(shared.http.http2.serve_connection(io, service))
    } else {
        Box::pin(shared.http.http1.serve_connection(io, service))
    };
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
                    shared.metrics.reject(RejectionReason::HeaderTimeout);
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
            _ = drained(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Handles one request: runs the checks, forwards or refuses, echoes the ids, counts and audits.
async fn handle_request(
    shared: &Arc<Shared>,
    conn: &Connection,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    // The sender's whole wait, from the request head to the response head (DESIGN.md §5).
    let deadline = tokio::time::Instant::now() + shared.upstreams.request_timeout();
    let echo = EchoIds::from_headers(request.headers());
    // The gateway's own answers come in the caller's format (FHIR JSON or XML).
    let format = bars::accept::response_format(request.headers(), request.uri());
    let mut audit = AuditRecord::new(&conn.peer, &request);
    let mut response = match check_and_forward(shared, conn, request, &mut audit, deadline).await {
        Ok(response) => response,
        Err(refusal) => {
            shared.metrics.reject(refusal.outcome().reason);
            let response = render::refusal_response(&refusal, format);
            audit.refusal = Some(refusal);
            response
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
    audit.attach(shared.audit, response)
}

/// The request checks of DESIGN.md §1, in order; the first failure wins.
async fn check_and_forward(
    shared: &Arc<Shared>,
    conn: &Connection,
    request: Request<Incoming>,
    audit: &mut AuditRecord,
    deadline: tokio::time::Instant,
) -> Result<Response<GatewayBody>, Refusal> {
    // Framing: Content-Length and Transfer-Encoding together (RFC 9112 §6.1: an error; hyper
    // reads chunked and closes the connection after the answer).
    if conn
        .framing
        .as_ref()
        .is_some_and(|f| f.next_request_has_both_lengths())
    {
        return Err(Refusal::InvalidRequest(
            "Content-Length and Transfer-Encoding must not both be sent".into(),
        ));
    }

    // Ids: X-Request-Id and X-Correlation-Id present and UUIDs (400), first and "without
    // exception" (BaRS IG): before the size, path and method checks.
    let ids = bars::ids::read_request_ids(request.headers())?;
    audit.request_id = Some(ids.request_id);
    audit.correlation_id = Some(ids.correlation_id);

    // Size: the header section within listen.max_header_bytes (431).
    bars::header_section::check_header_section(&request, shared.listen.max_header_bytes)?;

    // Route: a known method and path under the BaRS base path (404 / 405 / 400 for unsafe paths).
    let route = shared
        .routes
        .resolve(request.method(), request.uri(), request.version())?;
    audit.endpoint = Some(route.endpoint.name());

    // Identity headers: NHSD-* decoded (400 when not Base64 JSON), required per endpoint and mode
    // (400); an unexpected shape is forwarded and counted unless strict or needed (§5a).
    let strict = shared.bars.require_identity_headers;
    let identity = bars::identity::read_identity_headers(
        request.headers(),
        IdentityPolicy {
            required: route.endpoint.identity_requirements(strict),
            strict,
            target_needed: shared.routes_by_target,
        },
    )?;
    shared
        .identity_warnings
        .report(&shared.metrics, &identity.warnings, &ids.request_id);
    // What the legacy system is told of the sender (X-BaRS-*), from the decoded headers; the
    // audit record keeps the typed values.
    let bars_target = identity
        .target
        .as_ref()
        .and_then(|t| header_value(&t.to_string()));
    let ods_code = identity
        .organisation
        .as_ref()
        .and_then(|o| header_value(o.ods_code.as_str()));
    audit.target = identity.target;
    audit.ods_code = identity.organisation.map(|o| o.ods_code);
    audit.software = identity.software.and_then(|s| s.id);

    // Accept: the major version asked for is served (406).
    bars::accept::check_accept(request.headers(), &shared.bars.accepted_major_versions)?;

    // Upstream: by NHSD-Target-Identifier, else the default (404 when none serves the target).
    let upstream = shared.upstreams.select(audit.target.as_ref())?;

    let added = ForwardedHeaders {
        forwarded_for: conn.forwarded_for.clone(),
        cert_subject: conn.cert_subject.clone(),
        cert_sha256: conn.cert_sha256.clone(),
        bars_target,
        ods_code,
        possible_duplicate: false,
        request_id: Some(ids.request_id),
        correlation_id: Some(ids.correlation_id),
    };
    let (parts, body) = request.into_parts();

    // Methods that are not deduplicated (reads) stream straight through (408 / 413 / 503).
    if !shared.dedup_settings.methods.contains(&parts.method) {
        let body = shared.upstreams.streaming_body(&parts.headers, body)?;
        let started = Instant::now();
        let result = shared
            .upstreams
            .forward(
                upstream,
                parts,
                body,
                &route.path_and_query,
                &added,
                deadline,
            )
            .await;
        audit.upstream_duration = Some(started.elapsed());
        shared
            .metrics
            .upstream_duration
            .observe(started.elapsed().as_secs_f64());
        return result;
    }

    // Dedup: after access control, before processing (BaRS IG). The body is read (bounded by
    // max_body, 413, and the deadline, 408) because it is part of what makes a retry "the same
    // message"; then claim, forward once, record (dedup::once).
    let body = shared
        .upstreams
        .buffered_body(&parts.headers, body, deadline)
        .await?;
    let fingerprint =
        Fingerprint::of_chunks(&parts.method, &parts.uri, &parts.headers, &body.chunks);
    let delivery = Delivery {
        upstream: upstream.clone(),
        ids,
        fingerprint,
        parts,
        body,
        path_and_query: route.path_and_query,
        added,
    };
    let delivered = shared.delivery.deliver(delivery, deadline).await;
    audit.dedup = Some(delivered.dedup);
    audit.upstream_duration = delivered.upstream_duration;
    delivered.response
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
            request_id: headers.get(REQUEST_ID_KEY).cloned(),
            correlation_id: headers.get(CORRELATION_ID_KEY).cloned(),
        }
    }

    fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in [
            (REQUEST_ID_KEY, self.request_id),
            (CORRELATION_ID_KEY, self.correlation_id),
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
