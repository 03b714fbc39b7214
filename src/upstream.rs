//! Forwarding to the legacy receiver over plain HTTP/1.1: one pooled client per upstream, request
//! and response header rewriting, the body limit, and upstream failures as BaRS refusals.
//!
//! The request is always re-serialised by hyper's client (never the client's raw framing), so a
//! legacy server behind only ever sees clean HTTP/1.1.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::bars::identity::TargetIdentifier;
use crate::bars::ids::{CorrelationId, RequestId};
use crate::bars::Refusal;
use crate::metrics::Metrics;

mod settings;
pub use settings::{UpstreamSettings, UpstreamUrl};

/// A boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends.
pub type GatewayBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Headers the gateway sets for the legacy receiver; any copy a client sends is removed first so
/// they cannot be spoofed (DESIGN.md §4).
pub const GATEWAY_OWNED_HEADERS: [HeaderName; 11] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_FORWARDED_PORT,
    X_REAL_IP,
    header::FORWARDED,
    X_CLIENT_CERT_SUBJECT,
    X_CLIENT_CERT_SHA256,
    X_BARS_TARGET,
    X_BARS_ODS_CODE,
    X_BARS_POSSIBLE_DUPLICATE,
];

pub use crate::bars::headers::X_BARS_POSSIBLE_DUPLICATE;
use crate::bars::headers::{
    NHSD_TARGET_IDENTIFIER, X_BARS_ODS_CODE, X_BARS_TARGET, X_CLIENT_CERT_SHA256,
    X_CLIENT_CERT_SUBJECT, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PORT, X_FORWARDED_PROTO,
    X_REAL_IP,
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and their old companions: never forwarded either way.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// A request body read whole, kept as the chunks it arrived in.
#[derive(Debug, Clone, Default)]
pub struct BufferedBody {
    /// The body's chunks, in order.
    pub chunks: Vec<Bytes>,
}

impl BufferedBody {
    /// The body as a streamed body for the upstream request, with its exact length known.
    pub fn into_body(self) -> GatewayBody {
        let len = self.chunks.iter().map(Bytes::len).sum::<usize>() as u64;
        ChunksBody {
            chunks: self.chunks.into(),
            remaining: len,
        }
        .boxed_unsync()
    }
}

/// Yields buffered chunks one frame each; its size hint is exact, so hyper sends Content-Length.
struct ChunksBody {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl http_body::Body for ChunksBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let next = self.chunks.pop_front();
        if let Some(chunk) = &next {
            self.remaining -= chunk.len() as u64;
        }
        std::task::Poll::Ready(next.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// What the gateway adds to a forwarded request.
#[derive(Debug, Clone)]
pub struct ForwardedHeaders {
    /// `X-Forwarded-For`: the admitted client address.
    pub forwarded_for: HeaderValue,
    /// `X-Client-Cert-Subject`.
    pub cert_subject: Option<HeaderValue>,
    /// `X-Client-Cert-Sha256`.
    pub cert_sha256: Option<HeaderValue>,
    /// `X-BaRS-Target` (`system|value`).
    pub bars_target: Option<HeaderValue>,
    /// `X-BaRS-Ods-Code`.
    pub ods_code: Option<HeaderValue>,
    /// `X-BaRS-Possible-Duplicate: true`: an earlier attempt's outcome is unknown.
    pub possible_duplicate: bool,
    /// The request's ids, for log lines (not forwarded from here: they are the client's own).
    pub request_id: Option<RequestId>,
    /// See `request_id`.
    pub correlation_id: Option<CorrelationId>,
}

/// One legacy receiver: its base URL and its own connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    url: UpstreamUrl,
    /// `url.authority`, parsed once.
    authority: Authority,
    client: Client<HttpConnector, GatewayBody>,
}

/// Every configured upstream, chosen per request by NHSD-Target-Identifier.
#[derive(Debug)]
pub struct Upstreams {
    default: Option<Arc<Upstream>>,
    by_target: HashMap<String, Arc<Upstream>>,
    request_timeout: Duration,
    max_body: u64,
    max_response_header_bytes: usize,
    strip_headers: Vec<HeaderName>,
    /// Where upstream failures are counted (`None` in unit tests).
    metrics: Option<Arc<Metrics>>,
}

impl Upstreams {
    /// Builds a pooled client per upstream. Needs a Tokio runtime.
    pub fn new(settings: &UpstreamSettings, metrics: Option<Arc<Metrics>>) -> Upstreams {
        // hyper refuses a head beyond its read buffer; the exact limit is checked on the parsed
        // head (`send`), the buffer only keeps a huge one from being read at all.
        let max_buf = (settings.max_response_header_bytes + 16 * 1024).max(8192);
        let make = |url: &UpstreamUrl| {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(settings.connect_timeout));
            connector.set_nodelay(true);
            connector.enforce_http(true);
            let client = Client::builder(TokioExecutor::new())
                // hyper-util applies the idle timeout only with a timer: without one, idle
                // connections stayed open for as long as the receiver kept them (scripts/soak.sh).
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(256)
                .http1_max_buf_size(max_buf)
                .build(connector);
            Arc::new(Upstream {
                url: url.clone(),
                // The config took it from a parsed URL, so it parses; were it not to, requests
                // would fail to connect (503) rather than go elsewhere.
                authority: url.authority.parse().unwrap_or_else(|e| {
                    tracing::error!(authority = %url.authority, error = %e, "invalid upstream authority");
                    Authority::from_static("invalid.")
                }),
                client,
            })
        };
        Upstreams {
            default: settings.url.as_ref().map(make),
            by_target: settings
                .routes
                .iter()
                .map(|(target, url)| (target.to_string(), make(url)))
                .collect(),
            request_timeout: settings.request_timeout,
            max_body: settings.max_body,
            max_response_header_bytes: settings.max_response_header_bytes,
            strip_headers: settings.strip_headers.clone(),
            metrics,
        }
    }

    /// The upstream for a request's target: its route, else the default, else 404.
    pub fn select(&self, target: Option<&TargetIdentifier>) -> Result<&Arc<Upstream>, Refusal> {
        if !self.by_target.is_empty() {
            if let Some(up) = target.and_then(|t| self.by_target.get(&t.to_string())) {
                return Ok(up);
            }
        }
        match (&self.default, target) {
            (Some(default), _) => Ok(default),
            // Only routes serve: a request naming no target (allowed on /metadata) cannot be routed.
            (None, None) => Err(Refusal::MissingHeader {
                header: NHSD_TARGET_IDENTIFIER,
            }),
            (None, Some(_)) => Err(Refusal::UnknownTarget),
        }
    }

    /// `host:port` of every upstream, for the readiness probe.
    pub fn authorities(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .default
            .iter()
            .chain(self.by_target.values())
            .map(|u| u.url.authority.clone())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The configured body limit.
    pub fn max_body(&self) -> u64 {
        self.max_body
    }

    /// `upstream.request_timeout`: the sender's whole wait.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The request body, streamed, cut off at `max_body` (413 up front when Content-Length says so).
    pub fn streaming_body(
        &self,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<GatewayBody, Refusal> {
        self.check_declared_length(headers)?;
        Ok(Limited::new(body, self.max_body as usize)
            .map_err(|e| e as BoxError)
            .boxed_unsync())
    }

    /// The whole request body, read into memory as the chunks it arrived in (no copy), but never
    /// beyond `max_body` (413) nor past `deadline`, the end of the sender's `request_timeout` (408).
    pub async fn buffered_body(
        &self,
        headers: &HeaderMap,
        body: Incoming,
        deadline: tokio::time::Instant,
    ) -> Result<BufferedBody, Refusal> {
        self.check_declared_length(headers)?;
        // hyper has no body read timeout, and the idle timeout does not run while a request is in
        // flight: without this deadline a body that trickles or stalls would hold the connection,
        // its buffer and a max_connections slot for ever. The sender has given up by then anyway.
        let read = async {
            let mut body = Limited::new(body, self.max_body as usize);
            let mut chunks = Vec::new();
            while let Some(frame) = body.frame().await {
                // Trailers are not forwarded (BaRS does not use them).
                if let Ok(data) = frame?.into_data() {
                    if !data.is_empty() {
                        chunks.push(data);
                    }
                }
            }
            Ok::<_, BoxError>(BufferedBody { chunks })
        };
        let Ok(collected) = tokio::time::timeout_at(deadline, read).await else {
            tracing::info!(timeout = ?self.request_timeout, "request body not received in time");
            return Err(Refusal::BodyTimeout);
        };
        match collected {
            Ok(buffered) => Ok(buffered),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::BodyTooLarge {
                limit: self.max_body,
            }),
            Err(e) => {
                // The client went away or sent a broken body: nothing was forwarded.
                tracing::info!(error = %e, "request body could not be read");
                Err(Refusal::InvalidRequest(
                    "The request body could not be read".into(),
                ))
            }
        }
    }

    fn check_declared_length(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        match content_length(headers) {
            Some(len) if len > self.max_body => Err(Refusal::BodyTooLarge {
                limit: self.max_body,
            }),
            _ => Ok(()),
        }
    }

    /// Sends a request whose route and headers passed every check and waits for the response
    /// head until `deadline`. `path_and_query` is the approved path (relative to the BaRS base
    /// path) and query. The head is checked (no upgrade, header section within
    /// `upstream.max_response_header_bytes`) and its framing made consistent; the body is the
    /// caller's to stream, wrapped by [`Upstreams::watch_body`].
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut parts: http::request::Parts,
        body: GatewayBody,
        path_and_query: &str,
        added: &ForwardedHeaders,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        // The authority is parsed once, at start; only the path is parsed here.
        let path_and_query = if upstream.url.base_path.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", upstream.url.base_path))
        };
        let uri = path_and_query
            .map_err(http::Error::from)
            .and_then(|p| {
                Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(upstream.authority.clone())
                    .path_and_query(p)
                    .build()
            })
            .map_err(|e| {
                tracing::error!(error = %e, "cannot build the upstream URI");
                UpstreamFailure::Internal
            })?;
        rewrite_request_headers(&mut parts.headers, &self.strip_headers, added);
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let outgoing = Request::from_parts(parts, body);

        let failure = |f: UpstreamFailure, detail: &dyn std::fmt::Display| {
            self.count_failure(f.kind());
            tracing::warn!(
                upstream = %upstream.url.authority,
                request_id = %OrDash(added.request_id),
                correlation_id = %OrDash(added.correlation_id),
                kind = f.kind(),
                error = %detail,
                "upstream exchange failed"
            );
            f
        };
        let mut response =
            match tokio::time::timeout_at(deadline, upstream.client.request(outgoing)).await {
                Err(_elapsed) => {
                    return Err(failure(UpstreamFailure::Timeout, &"no answer in time"));
                }
                Ok(Err(e)) => {
                    let f = UpstreamFailure::of_client_error(&e);
                    if f == UpstreamFailure::BodyTooLarge {
                        // The sender's streamed body, not the legacy system, was at fault.
                        return Err(f);
                    }
                    return Err(failure(f, &error_chain(&e)));
                }
                Ok(Ok(response)) => response,
            };
        // An upgrade was never asked for: the gateway never switches protocols for the legacy
        // system (hyper hands back an unsolicited 101 as a response).
        if response.status().is_informational() || response.headers().contains_key(header::UPGRADE)
        {
            return Err(failure(
                UpstreamFailure::BadResponse("an unsolicited protocol upgrade"),
                &response.status(),
            ));
        }
        if response_header_bytes(&response) > self.max_response_header_bytes {
            return Err(failure(
                UpstreamFailure::BadResponse("a response header section over the limit"),
                &format!("over {} bytes", self.max_response_header_bytes),
            ));
        }
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and hyper decoded the body
        // as chunked; a stale Content-Length passed on would truncate the body or hang the sender.
        if response.headers().contains_key(header::TRANSFER_ENCODING) {
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        remove_hop_by_hop(response.headers_mut());
        Ok(response)
    }

    /// Forwards a request that is not deduplicated: the response head by `deadline`, its body
    /// streamed and watched.
    pub async fn forward(
        &self,
        upstream: &Upstream,
        parts: http::request::Parts,
        body: GatewayBody,
        path_and_query: &str,
        added: &ForwardedHeaders,
        deadline: tokio::time::Instant,
    ) -> Result<Response<GatewayBody>, Refusal> {
        let response = self
            .send(upstream, parts, body, path_and_query, added, deadline)
            .await
            .map_err(|f| f.refusal(self.max_body))?;
        Ok(response.map(|body| self.watch_body(body, added).boxed_unsync()))
    }

    /// The response body as the gateway streams it: cut off when the legacy system stalls
    /// mid-body, and a body that breaks off is logged with the ids and counted.
    pub fn watch_body(&self, body: Incoming, added: &ForwardedHeaders) -> UpstreamBody {
        UpstreamBody {
            body,
            timeout: self.request_timeout,
            deadline: Box::pin(tokio::time::sleep(self.request_timeout)),
            waiting: false,
            request_id: added.request_id,
            correlation_id: added.correlation_id,
            metrics: self.metrics.clone(),
        }
    }

    fn count_failure(&self, kind: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.upstream_failure(kind);
        }
    }
}

/// Why an exchange with the legacy system gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFailure {
    /// Could not connect (refused, connect timeout): certainly not delivered.
    #[error("could not connect")]
    Connect,
    /// No response head by the deadline.
    #[error("no answer in time")]
    Timeout,
    /// The connection was reset or closed before a response head.
    #[error("no answer (connection closed or reset)")]
    NoAnswer,
    /// A response that cannot be passed on (an upgrade, an oversized or unparseable head).
    #[error("an unusable response: {0}")]
    BadResponse(&'static str),
    /// The sender's streamed body went over `max_body` on the way.
    #[error("the request body went over max_body")]
    BodyTooLarge,
    /// The gateway could not build the request.
    #[error("internal error")]
    Internal,
}

impl UpstreamFailure {
    fn of_client_error(e: &hyper_util::client::legacy::Error) -> UpstreamFailure {
        if error_chain_has::<http_body_util::LengthLimitError>(e) {
            return UpstreamFailure::BodyTooLarge;
        }
        if e.is_connect() {
            return UpstreamFailure::Connect;
        }
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(h) = err.downcast_ref::<hyper::Error>() {
                if h.is_parse_too_large() {
                    return UpstreamFailure::BadResponse(
                        "a response header section over the limit",
                    );
                }
                if h.is_parse() || h.is_parse_status() {
                    return UpstreamFailure::BadResponse("a malformed response head");
                }
            }
            cur = err.source();
        }
        UpstreamFailure::NoAnswer
    }

    /// Whether the legacy system may have received the whole request and processed it: every
    /// failure after the request could be written (DESIGN.md §5 "uncertain outcome").
    pub fn may_have_been_processed(self) -> bool {
        matches!(
            self,
            UpstreamFailure::Timeout | UpstreamFailure::NoAnswer | UpstreamFailure::BadResponse(_)
        )
    }

    /// The `kind` label of `bars_gateway_upstream_failures_total`.
    pub fn kind(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::NoAnswer => "no_answer",
            UpstreamFailure::BadResponse(_) => "bad_response",
            UpstreamFailure::BodyTooLarge => "body_too_large",
            UpstreamFailure::Internal => "internal",
        }
    }

    /// What the sender gets.
    pub fn refusal(self, max_body: u64) -> Refusal {
        match self {
            UpstreamFailure::Connect | UpstreamFailure::NoAnswer => Refusal::UpstreamUnavailable,
            UpstreamFailure::Timeout => Refusal::UpstreamTimeout,
            UpstreamFailure::BadResponse(problem) => Refusal::UpstreamBadResponse { problem },
            UpstreamFailure::BodyTooLarge => Refusal::BodyTooLarge { limit: max_body },
            UpstreamFailure::Internal => Refusal::Internal,
        }
    }
}

/// The size of a response head as HTTP/1.1 carries it (status line and fields).
fn response_header_bytes<B>(response: &Response<B>) -> usize {
    let fields: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    fields + 17
}

/// Displays an optional id, or `-`.
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A response body from the legacy system as the gateway streams it. It fails when the legacy
/// system sends nothing for `request_timeout` while the gateway waits (without this, a receiver
/// that stalls mid-body would hold the sender, the connection and its slot for ever; the time the
/// sender takes to read is not counted), and a body that breaks off (reset, bad chunk framing,
/// premature close, stall) is logged at WARN with the ids and counted as
/// `upstream_failures_total{kind="broken_body"}`.
pub struct UpstreamBody {
    body: Incoming,
    timeout: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
    request_id: Option<RequestId>,
    correlation_id: Option<CorrelationId>,
    metrics: Option<Arc<Metrics>>,
}

impl UpstreamBody {
    fn broke(&self, error: &dyn std::fmt::Display) {
        if let Some(m) = &self.metrics {
            m.upstream_failure("broken_body");
        }
        tracing::warn!(
            request_id = %OrDash(self.request_id),
            correlation_id = %OrDash(self.correlation_id),
            error = %error,
            "upstream response body broke off: the sender gets a closed connection"
        );
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.waiting = false;
                let e = error_chain(&e);
                this.broke(&e);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    this.deadline.as_mut().reset(deadline);
                }
                if std::future::Future::poll(this.deadline.as_mut(), cx).is_ready() {
                    this.broke(&format_args!("stalled for {:?} mid-body", this.timeout));
                    return Poll::Ready(Some(Err("the upstream stalled mid-body".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares request headers for the legacy receiver: hop-by-hop, `Host`, configured,
/// gateway-owned and underscored headers removed; the gateway's own added.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    strip: &[HeaderName],
    added: &ForwardedHeaders,
) {
    remove_hop_by_hop(headers);
    // CGI-style receivers (PHP, WSGI, Rack, ...) read `X_Client_Cert_Subject` and
    // `X-Client-Cert-Subject` as the same variable, so an underscored twin could shadow the
    // gateway's own headers or a validated NHSD one. No BaRS header has an underscore: drop them
    // all, as nginx does by default (`underscores_in_headers off`).
    // (An empty Vec does not allocate: the common case costs one scan of the names.)
    let underscored: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in underscored {
        headers.remove(name);
    }
    // hyper's client sets Host from the upstream URI, as nginx's proxy_pass does by default.
    headers.remove(header::HOST);
    for name in strip {
        headers.remove(name);
    }
    for name in &GATEWAY_OWNED_HEADERS {
        headers.remove(name);
    }
    headers.insert(X_FORWARDED_FOR, added.forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    let optional = [
        (X_CLIENT_CERT_SUBJECT, &added.cert_subject),
        (X_CLIENT_CERT_SHA256, &added.cert_sha256),
        (X_BARS_TARGET, &added.bars_target),
        (X_BARS_ODS_CODE, &added.ods_code),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            headers.insert(name, v.clone());
        }
    }
    if added.possible_duplicate {
        headers.insert(X_BARS_POSSIBLE_DUPLICATE, HeaderValue::from_static("true"));
    }
}

fn error_chain_has<E: std::error::Error + 'static>(
    err: &(dyn std::error::Error + 'static),
) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added() -> ForwardedHeaders {
        ForwardedHeaders {
            forwarded_for: HeaderValue::from_static("34.89.0.111"),
            cert_subject: Some(HeaderValue::from_static(
                "CN=bars-proxy.spineservices.nhs.uk",
            )),
            cert_sha256: Some(HeaderValue::from_static("ab")),
            bars_target: None,
            ods_code: None,
            possible_duplicate: false,
            request_id: None,
            correlation_id: None,
        }
    }

    #[test]
    fn spoofed_gateway_headers_are_replaced_and_stripped_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-client-cert-subject", HeaderValue::from_static("CN=evil"));
        h.insert("x-bars-target", HeaderValue::from_static("evil|1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("gateway"));
        h.insert("nhsd-target-identifier", HeaderValue::from_static("abc"));
        h.insert("x_client_cert_subject", HeaderValue::from_static("CN=evil"));
        h.insert("nhsd_target_identifier", HeaderValue::from_static("evil"));
        rewrite_request_headers(&mut h, &[header::AUTHORIZATION], &added());
        assert!(h.keys().all(|name| !name.as_str().contains('_')));
        assert_eq!(h["x-forwarded-for"], "34.89.0.111");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["x-client-cert-subject"],
            "CN=bars-proxy.spineservices.nhs.uk"
        );
        assert!(h.get("x-bars-target").is_none());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::HOST).is_none());
        assert_eq!(
            h["nhsd-target-identifier"], "abc",
            "NHSD headers pass untouched"
        );
    }
}
