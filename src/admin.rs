//! The admin listener (plain HTTP, loopback by default): `/healthz`, `/readyz`, `/metrics`.
//!
//! Readiness is computed in the background, not per probe: a task connects to every upstream
//! every [`PROBE_INTERVAL`], records when all of them last accepted a TCP connection, pings
//! the dedup store (Redis) and checks the served certificate. `/readyz` answers JSON with one
//! field per check (`{"ready": false, "tls": "ok", "upstream": "not accepting connections:
//! 127.0.0.1:8080", "dedup_store": "ok"}`), and each check going bad or recovering is logged once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
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

/// `[admin]`: the plain-HTTP health and metrics listener.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// Address to bind; `None` disables the admin listener.
    pub address: Option<SocketAddr>,
}

/// How often the upstreams are probed.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How recent the last successful probe must be for `/readyz` to say ready.
pub(crate) const READY_WINDOW: Duration = Duration::from_secs(10);

/// What `/readyz` reports on: one check each for the TLS material, the upstreams and the dedup
/// store. Each check's last problem is kept for the JSON body, and each change is logged once.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    tls_loaded: AtomicBool,
    upstream_ok_at: AtomicI64,
    store_ok: AtomicBool,
    /// Egress: the last access token request failed (false while none was needed).
    egress_token_failing: AtomicBool,
    problems: Mutex<Problems>,
}

/// The last problem of each check (`None`: fine).
#[derive(Debug, Default, Clone)]
struct Problems {
    tls: Option<String>,
    upstream: Option<String>,
    store: Option<String>,
    probed: bool,
}

/// Checks that the served TLS material is usable now (e.g. that the leaf has not expired since
/// it was loaded); given to [`Readiness::probe`] by whoever owns the live TLS state.
pub(crate) type TlsCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A check's state for transition logging: logs once at WARN when it goes bad and once at INFO
/// when it recovers, never on every probe.
fn log_change(check: &'static str, was_ok: &mut bool, problem: &Option<String>) {
    match (problem, *was_ok) {
        (Some(problem), true) => {
            tracing::warn!(check, problem = %problem, "not ready: readiness check failing");
        }
        (None, false) => tracing::info!(check, "readiness check recovered"),
        _ => {}
    }
    *was_ok = problem.is_none();
}

impl Readiness {
    /// Records that TLS material is loaded and serving.
    pub(crate) fn set_tls_loaded(&self) {
        self.tls_loaded.store(true, Ordering::Relaxed);
    }

    /// Egress: records whether the latest access token request succeeded.
    pub(crate) fn set_egress_token_ok(&self, ok: bool) {
        self.egress_token_failing.store(!ok, Ordering::Relaxed);
    }

    fn upstream_fresh(&self) -> bool {
        let ok_at = self.upstream_ok_at.load(Ordering::Relaxed);
        ok_at > 0 && unix_now() - ok_at <= READY_WINDOW.as_secs() as i64
    }

    fn problems(&self) -> Problems {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ready when TLS is loaded and every upstream accepted a connection within [`READY_WINDOW`]
    /// (and, with `[egress]`, the latest token request, if one was needed, succeeded).
    pub(crate) fn is_ready(&self) -> bool {
        !self.egress_token_failing.load(Ordering::Relaxed)
            && self.tls_loaded.load(Ordering::Relaxed)
            && self.problems().tls.is_none()
            && self.store_ok.load(Ordering::Relaxed)
            && self.upstream_fresh()
    }

    /// The `/readyz` body: `ready` and one field per check, `"ok"` or what is wrong.
    pub(crate) fn report(&self) -> serde_json::Value {
        let problems = self.problems();
        let field = |problem: Option<String>| problem.unwrap_or_else(|| "ok".into());
        let tls = if self.tls_loaded.load(Ordering::Relaxed) {
            field(problems.tls)
        } else {
            "TLS material not loaded".into()
        };
        let upstream = match problems.upstream {
            Some(problem) => problem,
            None if !problems.probed => "not probed yet".into(),
            None if !self.upstream_fresh() => format!(
                "no successful probe in the last {} s",
                READY_WINDOW.as_secs()
            ),
            None => "ok".into(),
        };
        let store = if problems.probed {
            field(problems.store)
        } else {
            "not probed yet".into()
        };
        let mut report = serde_json::json!({
            "ready": self.is_ready(),
            "tls": tls,
            "upstream": upstream,
            "dedup_store": store,
        });
        if self.egress_token_failing.load(Ordering::Relaxed) {
            report["egress_token"] = "the latest access token request failed".into();
        }
        report
    }

    /// Probes the TLS material, the upstreams and the dedup store until `shutdown` turns true.
    pub(crate) async fn probe(
        self: Arc<Self>,
        authorities: Vec<String>,
        connect_timeout: Duration,
        store: Arc<DedupStore>,
        tls_check: TlsCheck,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Each check starts "fine", so that only a real problem is logged, once.
        let (mut tls_was_ok, mut upstream_was_ok, mut store_was_ok) = (true, true, true);
        loop {
            let tls = tls_check().err();
            let store_problem =
                (!store.is_reachable().await).then(|| "dedup store unreachable".to_string());
            let mut failing = Vec::new();
            for authority in &authorities {
                let ok = matches!(
                    tokio::time::timeout(connect_timeout, TcpStream::connect(authority.as_str()))
                        .await,
                    Ok(Ok(_))
                );
                if !ok {
                    failing.push(authority.as_str());
                }
            }
            let upstream = (!failing.is_empty())
                .then(|| format!("not accepting connections: {}", failing.join(", ")));
            if upstream.is_none() {
                self.upstream_ok_at.store(unix_now(), Ordering::Relaxed);
            } else {
                self.upstream_ok_at.store(0, Ordering::Relaxed);
            }
            self.store_ok
                .store(store_problem.is_none(), Ordering::Relaxed);
            log_change("tls", &mut tls_was_ok, &tls);
            log_change("upstream", &mut upstream_was_ok, &upstream);
            log_change("dedup_store", &mut store_was_ok, &store_problem);
            *self.problems.lock().unwrap_or_else(|e| e.into_inner()) = Problems {
                tls,
                upstream,
                store: store_problem,
                probed: true,
            };
            if let Some(entries) = store.entry_count() {
                metrics
                    .dedup_entries
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
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
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, _)) = crate::drain::accept_until_drained(
        &listener,
        &mut shutdown,
        "admin accept failed",
        Duration::from_millis(100),
    )
    .await
    {
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
        "/readyz" => {
            let report = readiness.report();
            let status = if report["ready"] == true {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{report}\n"), "application/json")
        }
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
