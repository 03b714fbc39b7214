//! The admin listener (plain HTTP, loopback by default): `/healthz`, `/readyz`, `/metrics`.
//!
//! Readiness is computed in the background, not per probe: a task connects to every upstream
//! every [`PROBE_INTERVAL`], records when all of them last accepted a TCP connection, and pings
//! the dedup store (Redis).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::dedup::DedupStore;
use crate::metrics::Metrics;
use crate::tls::inspect::unix_now;

/// How often the upstreams are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How recent the last successful probe must be for `/readyz` to say ready.
pub const READY_WINDOW: Duration = Duration::from_secs(10);

/// What `/readyz` reports on.
#[derive(Debug, Default)]
pub struct Readiness {
    tls_loaded: AtomicBool,
    upstream_ok_at: AtomicI64,
    store_ok: AtomicBool,
    /// Egress: the last access token request failed (false while none was needed).
    egress_token_failing: AtomicBool,
}

impl Readiness {
    /// Records that TLS material is loaded and serving.
    pub fn set_tls_loaded(&self) {
        self.tls_loaded.store(true, Ordering::Relaxed);
    }

    /// Egress: records whether the latest access token request succeeded.
    pub fn set_egress_token_ok(&self, ok: bool) {
        self.egress_token_failing.store(!ok, Ordering::Relaxed);
    }

    /// Ready when TLS is loaded and every upstream accepted a connection within [`READY_WINDOW`]
    /// (and, with `[egress]`, the latest token request, if one was needed, succeeded).
    pub fn is_ready(&self) -> bool {
        let ok_at = self.upstream_ok_at.load(Ordering::Relaxed);
        !self.egress_token_failing.load(Ordering::Relaxed)
            && self.tls_loaded.load(Ordering::Relaxed)
            && self.store_ok.load(Ordering::Relaxed)
            && ok_at > 0
            && unix_now() - ok_at <= READY_WINDOW.as_secs() as i64
    }

    /// Probes the upstreams and the dedup store until `shutdown` turns true.
    pub async fn probe(
        self: Arc<Self>,
        authorities: Vec<String>,
        connect_timeout: Duration,
        store: Arc<DedupStore>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Starts "reachable" so that only a real outage is logged, once.
        let mut store_was_ok = true;
        loop {
            let store_ok = store.is_reachable().await;
            // Log transitions only: a Redis outage must not write a line every probe.
            if store_ok != store_was_ok {
                if store_ok {
                    tracing::info!("readiness probe: dedup store reachable again");
                } else {
                    tracing::warn!("readiness probe: dedup store unreachable");
                }
                store_was_ok = store_ok;
            }
            self.store_ok.store(store_ok, Ordering::Relaxed);
            let mut all_ok = true;
            for authority in &authorities {
                let ok = matches!(
                    tokio::time::timeout(connect_timeout, TcpStream::connect(authority.as_str()))
                        .await,
                    Ok(Ok(_))
                );
                if !ok {
                    all_ok = false;
                    tracing::debug!(upstream = %authority, "readiness probe: upstream not accepting connections");
                }
            }
            if all_ok {
                self.upstream_ok_at.store(unix_now(), Ordering::Relaxed);
            } else {
                self.upstream_ok_at.store(0, Ordering::Relaxed);
            }
            metrics.ready.set(i64::from(self.is_ready()));
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = crate::drained(&mut shutdown) => return,
            }
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::drained(&mut shutdown) => return,
        };
        let registry = registry.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&req, &registry, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        r
    };
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: TLS material not loaded, upstream not accepting connections, or dedup store unreachable\n".into(),
            "text/plain",
        ),
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                    "text/plain",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}
