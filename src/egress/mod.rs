//! Egress: the legacy system as a BaRS sender (DESIGN.md §5b). A second, plain-HTTP listener takes
//! a BaRS request from the legacy system and sends it to the BaRS API over HTTPS, doing the
//! transport work a sender owes: the signed-JWT token, the BaRS headers, the retry rules.
//!
//! One request, in order: admit the peer (`egress.allowed_ips`) ─► read the body (bounded; kept
//! for retries) ─► complete the headers (`headers`) ─► per attempt: token (`token`), send
//! (`client`), judge the answer (`retry`) ─► answer the legacy system with the API's answer, the
//! ids used and `X-BaRS-Attempts` ─► audit record.

pub(crate) mod client;
pub(crate) mod headers;
pub(crate) mod metrics;
pub(crate) mod report;
pub(crate) mod retry;
pub(crate) mod settings;
pub(crate) mod token;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Readiness;
use crate::bars::errors::Refusal;
use crate::bars::ids::RequestIds;
use crate::bars::render::{self, Format};
use crate::metrics::StatusLabel;
use crate::tls::material::MaterialError;
use crate::upstream::{BoxError, GatewayBody};
use headers::{complete_headers, HeaderDefaults, X_BARS_ATTEMPTS};
use metrics::EgressMetrics;
use retry::{backoff, judge, Verdict};
use settings::EgressSettings;
use token::{bearer, error_chain, ApiKey, SigningKey, TokenError, TokenSource};

/// Largest error answer read to check that it is an OperationOutcome; larger ones are passed on.
const MAX_ERROR_BODY: usize = 1024 * 1024;
/// Time allowed for the legacy system's request header section.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the egress side could not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressStartError {
    /// The signing key, API key or CA files are missing or invalid.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// The listener could not be bound.
    #[error("egress.address: cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

struct EgressState {
    settings: EgressSettings,
    client: client::HttpsClient,
    tokens: Option<TokenSource>,
    defaults: HeaderDefaults,
    metrics: Arc<EgressMetrics>,
    readiness: Option<Arc<Readiness>>,
    audit: bool,
}

/// The bound egress listener with everything loaded.
pub(crate) struct Egress {
    state: Arc<EgressState>,
    listener: TcpListener,
}

/// Loads what the egress side needs from disk (blocking): the HTTPS client, and for an
/// authenticated environment the signing key and the API key.
pub(crate) fn load(
    settings: &EgressSettings,
) -> Result<(client::HttpsClient, Option<(SigningKey, ApiKey)>), MaterialError> {
    let client = client::build(settings)?;
    let credentials = match &settings.auth {
        Some(auth) => Some((
            SigningKey::load(auth)?,
            ApiKey::load(auth.api_key_file.as_deref())?,
        )),
        None => None,
    };
    Ok((client, credentials))
}

impl Egress {
    /// Loads the keys, registers the egress metrics and binds `egress.address`.
    pub(crate) async fn bind(
        settings: &EgressSettings,
        registry: &mut Registry,
        readiness: Option<Arc<Readiness>>,
        audit: bool,
    ) -> Result<Egress, EgressStartError> {
        let owned = settings.clone();
        let (client, credentials) = tokio::task::spawn_blocking(move || load(&owned))
            .await
            .map_err(|e| MaterialError {
                key: "egress".into(),
                path: Default::default(),
                problem: format!("loading task failed: {e}"),
            })??;
        let metrics = Arc::new(EgressMetrics::register(registry));
        let tokens = match (credentials, &settings.auth) {
            (Some((key, api_key)), Some(auth)) => Some(TokenSource::new(
                key,
                api_key,
                auth.token_url.clone(),
                client.clone(),
                settings.retry.attempt_timeout,
                metrics.clone(),
            )),
            _ => None,
        };
        let listener = TcpListener::bind(settings.address)
            .await
            .map_err(|source| EgressStartError::Bind {
                address: settings.address,
                source,
            })?;
        Ok(Egress {
            state: Arc::new(EgressState {
                defaults: HeaderDefaults::new(settings),
                settings: settings.clone(),
                client,
                tokens,
                metrics,
                readiness,
                audit,
            }),
            listener,
        })
    }

    /// The bound address (useful with port 0).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.state.settings.address)
    }

    /// Serves the legacy system until `drain` turns true, then lets requests in flight finish for
    /// up to `grace`.
    pub(crate) async fn serve(self, mut drain: watch::Receiver<bool>, grace: Duration) {
        let Egress { state, listener } = self;
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), api_base = %state.settings.api_base, "egress listening");
        while let Some((stream, peer)) = crate::drain::accept_until_drained(
            &listener,
            &mut drain,
            "egress accept failed",
            Duration::from_millis(50),
        )
        .await
        {
            if !state
                .settings
                .allowed_ips
                .iter()
                .any(|net| net.contains(&peer.ip()))
            {
                tracing::warn!(peer = %peer, reason = "ip_not_allowed", "egress connection refused");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, peer, request).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let watched = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = watched.await;
            });
        }
        drop(listener);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("egress: shutdown grace expired with requests still in flight");
        }
    }
}

/// What one egress request ended with.
struct Outcome {
    response: Response<GatewayBody>,
    attempts: u32,
    refusal: Option<Refusal>,
}

async fn handle(
    state: &EgressState,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let sent_ids = (
        parts.headers.get("x-request-id").cloned(),
        parts.headers.get("x-correlation-id").cloned(),
    );
    let mut audit = EgressAudit {
        peer,
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        ids: None,
        target: None,
    };
    let outcome = match prepare(state, &parts, body).await {
        Err(refusal) => {
            let mut response = egress_refusal_response(&refusal);
            for (name, value) in [
                ("x-request-id", sent_ids.0),
                ("x-correlation-id", sent_ids.1),
            ] {
                if let Some(v) = value {
                    response.headers_mut().insert(name, v);
                }
            }
            Outcome {
                response,
                attempts: 0,
                refusal: Some(refusal),
            }
        }
        Ok((completed, uri, body)) => {
            audit.ids = Some(completed.ids);
            audit.target = Some(completed.target.to_string());
            let mut outcome = send(
                state,
                &parts.method,
                &uri,
                &completed.headers,
                body,
                completed.ids,
            )
            .await;
            let headers = outcome.response.headers_mut();
            for name in [CONNECTION, TRANSFER_ENCODING] {
                headers.remove(name);
            }
            headers.insert(
                "x-request-id",
                header_text(&completed.ids.request_id.to_string()),
            );
            headers.insert(
                "x-correlation-id",
                header_text(&completed.ids.correlation_id.to_string()),
            );
            outcome
        }
    };
    let Outcome {
        mut response,
        attempts,
        refusal,
    } = outcome;
    response
        .headers_mut()
        .insert(X_BARS_ATTEMPTS.clone(), header_text(&attempts.to_string()));
    let status = response.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&StatusLabel { status })
        .inc();
    if attempts > 0 {
        state.metrics.attempts.observe(f64::from(attempts));
    }
    audit.finish(
        state.audit,
        status,
        attempts,
        refusal.as_ref(),
        started.elapsed(),
    );
    response
}

fn header_text(text: &str) -> HeaderValue {
    // Safe: callers pass UUIDs and numbers.
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-"))
}

/// Reads the body and completes the headers; the target URL is `api_base` + the request's path.
async fn prepare(
    state: &EgressState,
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<(headers::Completed, Uri, Bytes), Refusal> {
    let limit = state.settings.max_body;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Refusal::BodyTooLarge { limit });
    }
    let body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::BodyTooLarge { limit }
            } else {
                Refusal::InvalidRequest("The request body could not be read".into())
            }
        })?
        .to_bytes();
    let completed = complete_headers(&parts.headers, &state.defaults, !body.is_empty())?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if !path.starts_with('/') {
        return Err(Refusal::InvalidRequest(
            "The request target must be a path".into(),
        ));
    }
    let base = &state.settings.api_base;
    let uri = Uri::builder()
        .scheme("https")
        .authority(base.authority().map_or("", |a| a.as_str()))
        .path_and_query(format!("{}{path}", base.path().trim_end_matches('/')))
        .build()
        .map_err(|_| Refusal::InvalidRequest("The request path is not valid".into()))?;
    Ok((completed, uri, body))
}

/// The last thing an attempt produced.
enum Last {
    Answer(Response<GatewayBody>),
    TimedOut,
    Unreachable(String),
}

/// Sends with the BaRS retry rules: same ids, same body, a fresh token when needed.
async fn send(
    state: &EgressState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    ids: RequestIds,
) -> Outcome {
    let policy = &state.settings.retry;
    let deadline = Instant::now() + policy.retry_budget;
    let mut attempts = 0u32;
    let mut refreshed_after_401 = false;
    loop {
        attempts += 1;
        let token = match &state.tokens {
            None => None,
            Some(tokens) => {
                let result = tokens.token().await;
                if let Some(r) = &state.readiness {
                    r.set_egress_token_ok(result.is_ok());
                }
                match result {
                    Ok(t) => Some(t),
                    Err(e) => return token_refusal(e, attempts - 1),
                }
            }
        };
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers.clone();
        if let Some((name, value)) = token.as_ref().and_then(bearer) {
            request.headers_mut().insert(name, value);
        }
        let (verdict, last) = match tokio::time::timeout(
            policy.attempt_timeout,
            state.client.request(request),
        )
        .await
        {
            Err(_) => (Verdict::Retry { retry_after: None }, Last::TimedOut),
            Ok(Err(e)) => (
                Verdict::Retry { retry_after: None },
                Last::Unreachable(error_chain(&e)),
            ),
            Ok(Ok(response)) => {
                if response.status() == StatusCode::UNAUTHORIZED && !refreshed_after_401 {
                    if let (Some(tokens), Some(t)) = (&state.tokens, &token) {
                        // The token was revoked or expired early: renew it once and go again.
                        refreshed_after_401 = true;
                        tokens.invalidate(t).await;
                        tracing::info!(request_id = %ids.request_id, correlation_id = %ids.correlation_id, attempt = attempts, "BaRS API answered 401: renewing the access token");
                        continue;
                    }
                }
                judge_answer(response).await
            }
        };
        let Verdict::Retry { retry_after } = verdict else {
            return answered(last, attempts);
        };
        let wait = backoff(policy, attempts, retry_after);
        let what = match &last {
            Last::Answer(r) => r.status().as_u16().to_string(),
            Last::TimedOut => "timeout".into(),
            Last::Unreachable(e) => e.clone(),
        };
        if attempts >= policy.max_attempts || Instant::now() + wait > deadline {
            tracing::warn!(request_id = %ids.request_id, correlation_id = %ids.correlation_id, attempts, last = %what, "BaRS API: giving up (egress.max_attempts or egress.retry_budget reached)");
            return answered(last, attempts);
        }
        tracing::warn!(request_id = %ids.request_id, correlation_id = %ids.correlation_id, attempt = attempts, last = %what, wait_ms = wait.as_millis() as u64, "BaRS API attempt failed; retrying with the same ids");
        tokio::time::sleep(wait).await;
    }
}

/// Judges an HTTP answer; an error answer's body is read (bounded) to see if it is an
/// OperationOutcome, and kept so it can still be passed on.
async fn judge_answer(response: Response<Incoming>) -> (Verdict, Last) {
    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        let verdict = judge(status, response.headers(), true);
        let response = response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
        return (verdict, Last::Answer(response));
    }
    let (parts, body) = response.into_parts();
    let bytes = match Limited::new(body, MAX_ERROR_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return (
                Verdict::Retry { retry_after: None },
                Last::Unreachable(format!("the {status} answer's body broke off: {e}")),
            )
        }
    };
    #[derive(serde::Deserialize)]
    struct Resource<'a> {
        #[serde(rename = "resourceType", borrow)]
        resource_type: Option<&'a str>,
    }
    let is_outcome = serde_json::from_slice::<Resource<'_>>(&bytes)
        .is_ok_and(|r| r.resource_type == Some("OperationOutcome"))
        || bytes
            .windows(b"<OperationOutcome".len())
            .any(|w| w == b"<OperationOutcome");
    let verdict = judge(status, &parts.headers, is_outcome);
    let response = Response::from_parts(
        parts,
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    (verdict, Last::Answer(response))
}

fn answered(last: Last, attempts: u32) -> Outcome {
    match last {
        Last::Answer(response) => Outcome {
            response,
            attempts,
            refusal: None,
        },
        Last::TimedOut => refused(
            Refusal::EgressNoAnswer {
                attempts,
                timed_out: true,
                cause: "no response in time".into(),
            },
            attempts,
        ),
        Last::Unreachable(cause) => refused(
            Refusal::EgressNoAnswer {
                attempts,
                timed_out: false,
                cause,
            },
            attempts,
        ),
    }
}

fn token_refusal(e: TokenError, attempts: u32) -> Outcome {
    let refusal = match e {
        TokenError::Refused { .. } => Refusal::EgressTokenRefused {
            cause: e.to_string(),
        },
        _ => Refusal::EgressTokenUnavailable {
            cause: e.to_string(),
        },
    };
    refused(refusal, attempts)
}

fn refused(refusal: Refusal, attempts: u32) -> Outcome {
    Outcome {
        response: egress_refusal_response(&refusal),
        attempts,
        refusal: Some(refusal),
    }
}

/// One audit record per egress request (log target `audit`): ids, target, status, attempts.
/// Never the token, the body or decoded header content beyond the target.
struct EgressAudit {
    peer: SocketAddr,
    method: Method,
    path: String,
    ids: Option<RequestIds>,
    target: Option<String>,
}

impl EgressAudit {
    fn finish(
        self,
        audit: bool,
        status: u16,
        attempts: u32,
        refusal: Option<&Refusal>,
        total: Duration,
    ) {
        let request_id = self.ids.map(|i| i.request_id.to_string());
        let correlation_id = self.ids.map(|i| i.correlation_id.to_string());
        let diagnostics = refusal.map(ToString::to_string);
        if !audit {
            if let Some(refusal) = refusal {
                tracing::info!(
                    side = "egress",
                    client = %self.peer.ip(),
                    request_id = request_id.as_deref().unwrap_or("-"),
                    status,
                    reason = refusal.reason(),
                    diagnostics = diagnostics.as_deref().unwrap_or(""),
                    "egress request refused"
                );
            }
            return;
        }
        tracing::info!(
            target: "audit",
            side = "egress",
            client = %self.peer.ip(),
            method = %self.method,
            path = %self.path,
            request_id = request_id.as_deref().unwrap_or("-"),
            correlation_id = correlation_id.as_deref().unwrap_or("-"),
            bars_target = self.target.as_deref().unwrap_or("-"),
            status,
            attempts,
            reason = refusal.map_or("-", Refusal::reason),
            diagnostics = diagnostics.as_deref().unwrap_or(""),
            total_ms = total.as_millis() as u64,
            "egress request"
        );
    }
}

/// The gateway's own answer to the legacy system: FHIR JSON (the legacy system's side is ours to
/// define; docs/egress.md).
fn egress_refusal_response(refusal: &Refusal) -> http::Response<crate::upstream::GatewayBody> {
    render::refusal_response(refusal, Format::Json)
}
