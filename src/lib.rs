//! bars-gateway: a TLS-MA reverse-proxy sidecar that makes a legacy NHS system a BaRS receiver.
//!
//! [`Gateway::bind`] loads and validates everything, binds the listeners and returns a handle;
//! [`Gateway::serve`] runs until its shutdown future resolves, then drains. The accept loop, the
//! connection limit and the order of checks each connection and request goes through live in
//! `src/gateway.rs` (crate-private, like every module nothing outside the crate uses).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(unreachable_pub)]

pub(crate) mod admin;
pub mod admission;
pub(crate) mod audit;
pub mod bars;
pub mod check;
pub mod config;
pub mod dedup;
pub mod demo;
mod drain;
pub(crate) mod egress;
pub(crate) mod framing;
pub(crate) mod gateway;
pub(crate) mod idle;
pub mod keygen;
pub(crate) mod live;
pub(crate) mod logging;
pub mod metrics;
pub mod rejection;
pub mod reload;
mod shards;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub(crate) use drain::drained;

use admission::RefusalLogLimiter;
use config::{LogSettings, Settings};
use gateway::Shared;
use live::LiveState;
use metrics::Metrics;
pub use reload::Reloader;
use tls::material::MaterialError;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] MaterialError),
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals,
    /// The dedup store is misconfigured.
    #[error("dedup.redis_url: {0}")]
    Dedup(String),
    /// The egress side (`[egress]`) could not start.
    #[error(transparent)]
    Egress(#[from] egress::EgressStartError),
    /// A listener could not be bound.
    #[error("{key}: cannot listen on {address}: {source}")]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection threads (one runtime per core) could not start.
    #[error("cannot start the connection threads: {0}")]
    Shards(std::io::Error),
}

/// A bound, ready-to-serve gateway.
pub struct Gateway {
    settings: Settings,
    shared: Arc<Shared>,
    listener: TcpListener,
    shards: shards::Shards,
    admin: Option<TcpListener>,
    registry: Arc<Registry>,
    readiness: Arc<admin::Readiness>,
    reloader: Arc<Reloader>,
    file_watch: reload::FileWatch,
    egress: Option<egress::Egress>,
}

impl Gateway {
    /// Loads TLS material, binds the public and admin listeners. Must run inside a Tokio runtime.
    pub async fn bind(settings: Settings) -> Result<Gateway, StartError> {
        let tls_settings = settings.tls.clone();
        let client_settings = settings.client.clone();
        let loaded =
            tokio::task::spawn_blocking(move || tls::load(&tls_settings, &client_settings))
                .await
                .map_err(|e| MaterialError {
                    key: "tls".into(),
                    path: Default::default(),
                    problem: format!("loading task failed: {e}"),
                })??;
        let (metrics, mut registry) = Metrics::new();
        metrics.record_certificates(&loaded);
        let metrics = Arc::new(metrics);
        let dedup = dedup::DedupStore::new(
            &settings.dedup,
            dedup::in_flight_ttl(
                settings.upstream.request_timeout,
                settings.upstream.completion_timeout,
            ),
            metrics.clone(),
        )
        .map_err(|e| StartError::Dedup(e.0))?;
        let readiness = Arc::new(admin::Readiness::default());
        readiness.set_tls_loaded();
        let listener = TcpListener::bind(settings.listen.address)
            .await
            .map_err(|source| StartError::Bind {
                key: "listen.address",
                address: settings.listen.address,
                source,
            })?;
        let admin = match settings.admin.address {
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| StartError::Bind {
                            key: "admin.address",
                            address,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let dedup = Arc::new(dedup);
        // An upstream pool and the delivery that uses it: one for the main runtime (readiness
        // probe, startup facts) and one per shard.
        let pool = || {
            let upstreams = Arc::new(upstream::Upstreams::new(
                &settings.upstream,
                Some(metrics.clone()),
            ));
            let delivery = Arc::new(dedup::once::Deliverer {
                store: dedup.clone(),
                upstreams: upstreams.clone(),
                metrics: metrics.clone(),
                on_store_error: settings.dedup.on_store_error,
                max_replay_bytes: settings.dedup.max_replay_bytes,
                completion_timeout: settings.upstream.completion_timeout,
            });
            (upstreams, delivery)
        };
        let (upstreams, delivery) = pool();
        let shared = Arc::new(Shared {
            live: Arc::new(ArcSwap::from_pointee(LiveState::build(&settings, loaded))),
            routes: bars::routes::RouteTable::new(
                &settings.bars.base_path,
                settings.bars.bars_endpoints,
                settings.bars.extra_prefixes.clone(),
            ),
            upstreams,
            delivery,
            bars: settings.bars.clone(),
            dedup: dedup.clone(),
            dedup_settings: settings.dedup.clone(),
            listen: settings.listen.clone(),
            metrics: metrics.clone(),
            refusal_log: Arc::new(RefusalLogLimiter::new(Duration::from_secs(60), 10_000)),
            identity_warnings: Arc::new(bars::warnings::WarningReporter::new(Duration::from_secs(
                60,
            ))),
            routes_by_target: !settings.upstream.routes.is_empty(),
            audit: settings.log.audit,
            http: Shared::http_builder(&settings.listen),
        });
        let shards = shards::Shards::start(shards::default_count(), |_| {
            let (upstreams, delivery) = pool();
            Arc::new(shared.with_upstreams(upstreams, delivery))
        })
        .map_err(StartError::Shards)?;
        let egress = match &settings.egress {
            Some(e) => Some(
                egress::Egress::bind(
                    e,
                    &mut registry,
                    Some(readiness.clone()),
                    settings.log.audit,
                )
                .await?,
            ),
            None => None,
        };
        let reloader = Arc::new(Reloader::new(
            shared.live.clone(),
            LiveState::build,
            shared.metrics.clone(),
            settings.clone(),
        ));
        let file_watch = reloader.start_watching();
        Ok(Gateway {
            settings,
            reloader,
            file_watch,
            shared,
            listener,
            shards,
            admin,
            registry: Arc::new(registry),
            readiness,
            egress,
        })
    }

    /// The bound public address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // Safe: a bound TcpListener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or(self.settings.listen.address)
    }

    /// The bound admin address, if the admin listener is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound egress address, if `[egress]` is configured.
    pub fn egress_addr(&self) -> Option<SocketAddr> {
        self.egress.as_ref().map(egress::Egress::local_addr)
    }

    /// The metrics, for tests and embedding.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// A handle that reloads TLS material and admission lists.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets connections finish their
    /// requests for up to `listen.shutdown_grace`.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Gateway {
            settings,
            shared,
            listener,
            shards,
            admin,
            registry,
            readiness,
            reloader,
            file_watch,
            egress,
        } = self;
        let (drain_tx, drain_rx) = watch::channel(false);
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        let admin_address = admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "disabled".to_string(), |a| a.to_string());
        if let Some(admin_listener) = admin {
            tokio::spawn(admin::serve(
                admin_listener,
                registry,
                readiness.clone(),
                drain_rx.clone(),
            ));
        }
        let tls_check: admin::TlsCheck = {
            let shared = shared.clone();
            Arc::new(move || {
                let live = shared.live.load();
                let leaf = live.tls.server_leaf();
                if leaf.not_after < tls::inspect::unix_now() {
                    Err(format!(
                        "the served certificate {} expired at {}",
                        leaf.display_name(),
                        tls::inspect::format_time(leaf.not_after)
                    ))
                } else {
                    Ok(())
                }
            })
        };
        tokio::spawn(readiness.probe(
            shared.upstreams.authorities(),
            settings.upstream.connect_timeout,
            shared.dedup.clone(),
            tls_check,
            shared.metrics.clone(),
            drain_rx.clone(),
        ));
        tokio::spawn(reloader.watch(file_watch, drain_rx.clone()));
        let egress =
            egress.map(|e| tokio::spawn(e.serve(drain_rx.clone(), settings.listen.shutdown_grace)));
        let startup = StartupFacts::of(&settings, &shared);
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            environment = startup.environment,
            address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin_address,
            upstreams = %startup.upstreams,
            dedup = %startup.dedup,
            nearest_certificate_expiry_days = startup.nearest_expiry_days,
            nearest_certificate = %startup.nearest_certificate,
            "bars-gateway listening"
        );
        gateway::accept(shared, &shards, listener, shutdown, drain_rx, alive_tx).await;
        // accept() has closed the listener, so that once "draining" is logged no connection can
        // get in.
        tracing::info!(grace = ?settings.listen.shutdown_grace, "draining: no new connections, finishing requests in flight");
        let _ = drain_tx.send(true);
        // recv() returns None once every connection task has dropped its sender.
        if tokio::time::timeout(settings.listen.shutdown_grace, alive_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace expired with connections still open");
        }
        if let Some(egress) = egress {
            // The egress listener drains on the same signal, within its own grace.
            let _ = egress.await;
        }
        // Every connection has ended or the grace has run out: stop the connection threads.
        drop(shards);
        tracing::info!("bars-gateway stopped");
    }
}

/// What the startup line states besides the addresses: the facts an operator checks first.
struct StartupFacts {
    environment: &'static str,
    upstreams: String,
    dedup: String,
    nearest_expiry_days: i64,
    nearest_certificate: String,
}

impl StartupFacts {
    fn of(settings: &Settings, shared: &Shared) -> StartupFacts {
        let environment = match settings.client.environment {
            config::Environment::Int => "int",
            config::Environment::Prod => "prod",
            config::Environment::Custom => "custom",
        };
        let mut upstreams: Vec<String> = settings
            .upstream
            .url
            .iter()
            .map(|u| u.uri.to_string())
            .collect();
        upstreams.extend(
            settings
                .upstream
                .routes
                .iter()
                .map(|(target, url)| format!("{target} -> {}", url.uri)),
        );
        let dedup = match &settings.dedup.backend {
            config::DedupBackend::Memory => "memory".to_string(),
            config::DedupBackend::Redis { url } => format!("redis {}", check::redact_url(url)),
        };
        let live = shared.live.load();
        let now = tls::inspect::unix_now();
        let nearest = live
            .tls
            .server_chain
            .iter()
            .chain(live.tls.client_cas.iter().map(|(_, c)| c))
            .min_by_key(|c| c.not_after);
        StartupFacts {
            environment,
            upstreams: upstreams.join(", "),
            dedup,
            nearest_expiry_days: nearest.map_or(0, |c| c.days_left(now)),
            nearest_certificate: nearest.map_or_else(String::new, |c| c.display_name().to_string()),
        }
    }
}

/// Installs the global `tracing` subscriber from `[log]`; `RUST_LOG`, when set, overrides the level.
/// See `src/logging.rs` for the journal priorities and when colour is used.
pub fn init_logging(log: &LogSettings) {
    logging::init(log);
}

/// Runs the gateway from validated settings until SIGTERM or SIGINT; SIGHUP reloads TLS material.
pub async fn run(settings: Settings) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Register the handlers before anything else: a signal arriving before its handler exists
    // gets the default action, which for SIGHUP and SIGTERM is to die on the spot.
    let signals = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = signals else {
        return Err(StartError::Signals);
    };
    let gateway = Gateway::bind(settings).await?;
    let reloader = gateway.reloader();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config file's TLS material and admission lists");
            systemd_notify(&[
                sd_notify::NotifyState::Reloading,
                sd_notify::NotifyState::monotonic_usec_now()
                    .unwrap_or(sd_notify::NotifyState::Status("reloading")),
            ]);
            let _ = reloader.reload().await;
            systemd_notify(&[sd_notify::NotifyState::Ready]);
        }
    });
    // Bound and loaded: tell systemd (Type=notify) we are ready.
    systemd_notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("listening on {}", gateway.local_addr())),
    ]);
    gateway
        .serve(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            systemd_notify(&[sd_notify::NotifyState::Stopping]);
        })
        .await;
    Ok(())
}

/// Notifies systemd when running under it (`$NOTIFY_SOCKET` set); a no-op otherwise.
fn systemd_notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
