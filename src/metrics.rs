//! The Prometheus metrics of DESIGN.md §6, in one registry served by the admin listener.
//! Names are a contract (dashboards and alerts depend on them): prefix `bars_gateway_`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::rejection::RejectionReason;
use crate::tls::LoadedTls;

// The known values of each counter's label, created at 0 when the registry is made, so that every
// series exists from the first scrape and an alert on `increase(...[5m]) > 0` fires on the first
// event (a series that appears at 1 has no earlier sample to increase from). One list per label,
// here and nowhere else; a value missing from its list still counts, it just starts late.

/// Every `outcome` of `dedup_total` (src/dedup/).
pub const KNOWN_DEDUP_OUTCOMES: &[&str] = &[
    "first",
    "in_flight",
    "duplicate",
    "replayed",
    "id_reused",
    "store_error",
    "evicted",
    "uncertain",
    "first_after_uncertain",
    "late",
];

/// Every `reason` of `tls_handshake_failures_total` (src/gateway.rs).
pub const KNOWN_HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "bad_certificate",
    "no_client_certificate",
    "incompatible",
    "invalid_message",
    "other",
    "io",
    "timeout",
];

/// Every `result` of `reloads_total` (src/reload.rs).
pub const KNOWN_RELOAD_RESULTS: &[&str] = &["success", "failure"];

/// `{status}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: u16,
}

/// `{reason}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Low-cardinality reason.
    pub reason: &'static str,
}

/// `{header, problem}` labels of `identity_header_warnings_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityWarningLabel {
    /// The identity header's canonical name, e.g. `NHSD-End-User-Organisation`.
    pub header: &'static str,
    /// A `bars::warnings::ShapeProblem` label, e.g. `no_ods_code`.
    pub problem: &'static str,
}

/// `{outcome}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Dedup outcome.
    pub outcome: &'static str,
}

/// `{result}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Which certificate an expiry gauge is about.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CertRole {
    /// The served certificate (leaf).
    server,
    /// An intermediate of the served chain.
    server_chain,
    /// A trusted client CA.
    client_ca,
}

/// `{issuer}` label of the CRL gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabel {
    /// The CRL issuer's DN.
    pub issuer: String,
}

/// `{role, subject}` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// Role of the certificate.
    pub role: CertRole,
    /// Its subject DN.
    pub subject: String,
}

/// All gateway metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Responses sent, by status.
    pub requests: Family<StatusLabel, Counter>,
    /// Connections and requests refused, by reason.
    pub rejections: Family<ReasonLabel, Counter>,
    /// Dedup decisions, by outcome.
    pub dedup: Family<OutcomeLabel, Counter>,
    /// Time to the upstream's response headers.
    pub upstream_duration: Histogram,
    /// Failed TLS handshakes, by reason.
    pub tls_handshake_failures: Family<ReasonLabel, Counter>,
    /// notAfter of served and trusted certificates.
    pub certificate_expiry: Family<CertLabel, Gauge>,
    /// TLS reloads, by result.
    pub reloads: Family<ResultLabel, Counter>,
    /// Open client connections.
    pub connections_open: Gauge,
    /// 1 when `/readyz` would answer 200, else 0 (so alerts need no HTTP prober).
    pub ready: Gauge,
    /// Exchanges with the legacy system that gave no usable answer, by kind.
    pub upstream_failures: Family<KindLabel, Counter>,
    /// Identity headers forwarded although their shape is unexpected (DESIGN.md §5a).
    pub identity_header_warnings: Family<IdentityWarningLabel, Counter>,
    /// 1 when the last reload (or the start) succeeded, 0 while a failed one left the previous
    /// material in service: unlike `increase(reloads_total{result="failure"})`, it stays 0 until
    /// a reload succeeds.
    pub last_reload_success: Gauge,
    /// When the last reload attempt (or the start) happened, Unix seconds.
    pub last_reload_timestamp: Gauge,
    /// nextUpdate of each loaded CRL, Unix seconds, by issuer.
    pub crl_next_update: Family<IssuerLabel, Gauge>,
    /// Entries in the dedup store (memory store; absent for Redis, which other keys share).
    pub dedup_entries: Gauge,
    /// TCP connections accepted on the public listener (before admission).
    pub connections_accepted: Counter,
    /// TLS handshakes completed with a verified client certificate.
    pub tls_handshakes: Counter,
}

/// `{kind}` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Low-cardinality kind.
    pub kind: &'static str,
}

/// Every `kind` of `upstream_failures_total`, present from the first scrape.
pub const UPSTREAM_FAILURE_KINDS: [&str; 7] = [
    "connect",
    "timeout",
    "no_answer",
    "bad_response",
    "broken_body",
    "body_too_large",
    "internal",
];

impl Metrics {
    /// Creates the metrics and registers them in a new registry.
    pub fn new() -> (Metrics, Registry) {
        let mut registry = Registry::with_prefix("bars_gateway");
        let m = Metrics {
            requests: Family::default(),
            rejections: Family::default(),
            dedup: Family::default(),
            upstream_duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.1, 5.0, 10.0,
            ]),
            tls_handshake_failures: Family::default(),
            certificate_expiry: Family::default(),
            reloads: Family::default(),
            connections_open: Gauge::default(),
            ready: Gauge::default(),
            upstream_failures: Family::default(),
            identity_header_warnings: Family::default(),
            last_reload_success: Gauge::default(),
            last_reload_timestamp: Gauge::default(),
            crl_next_update: Family::default(),
            dedup_entries: Gauge::default(),
            connections_accepted: Counter::default(),
            tls_handshakes: Counter::default(),
        };
        for kind in UPSTREAM_FAILURE_KINDS {
            drop(m.upstream_failures.get_or_create(&KindLabel { kind }));
        }
        // Every `reason` of `rejections_total` comes from the one enum (src/rejection.rs).
        for reason in RejectionReason::ALL {
            let _ = m.rejections.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        for &outcome in KNOWN_DEDUP_OUTCOMES {
            let _ = m.dedup.get_or_create(&OutcomeLabel { outcome });
        }
        for &reason in KNOWN_HANDSHAKE_FAILURE_REASONS {
            let _ = m
                .tls_handshake_failures
                .get_or_create(&ReasonLabel { reason });
        }
        for &result in KNOWN_RELOAD_RESULTS {
            let _ = m.reloads.get_or_create(&ResultLabel { result });
        }
        // The start is the first load: it succeeded, or there would be no registry to scrape.
        m.record_reload(true);
        registry.register(
            "requests",
            "Responses sent, by HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "rejections",
            "Connections and requests refused by the gateway, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "dedup",
            "Retry deduplication decisions, by outcome",
            m.dedup.clone(),
        );
        registry.register_with_unit(
            "upstream_duration",
            "Time from forwarding to the legacy receiver's response headers",
            prometheus_client::registry::Unit::Seconds,
            m.upstream_duration.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of served and trusted certificates, Unix seconds",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "reloads",
            "TLS material reloads, by result",
            m.reloads.clone(),
        );
        registry.register(
            "connections_open",
            "Open client connections",
            m.connections_open.clone(),
        );
        registry.register(
            "ready",
            "1 when ready (TLS loaded, upstreams accepting, dedup store reachable), else 0",
            m.ready.clone(),
        );
        registry.register(
            "upstream_failures",
            "Exchanges with the legacy receiver that gave no usable answer, by kind",
            m.upstream_failures.clone(),
        );
        registry.register(
            "identity_header_warnings",
            "Identity headers forwarded although their shape is unexpected, by header and problem",
            m.identity_header_warnings.clone(),
        );
        registry.register(
            "last_reload_success",
            "1 when the last TLS reload (or the start) succeeded, 0 while the previous material stays in service after a failure",
            m.last_reload_success.clone(),
        );
        registry.register(
            "last_reload_timestamp_seconds",
            "When the last TLS reload attempt (or the start) happened, Unix seconds",
            m.last_reload_timestamp.clone(),
        );
        registry.register(
            "crl_next_update_timestamp_seconds",
            "nextUpdate of each loaded client CRL, Unix seconds",
            m.crl_next_update.clone(),
        );
        registry.register(
            "dedup_entries",
            "Request ids held by the memory dedup store",
            m.dedup_entries.clone(),
        );
        registry.register(
            "connections_accepted",
            "TCP connections accepted on the public listener, before admission",
            m.connections_accepted.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed with a verified client certificate",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        (m, registry)
    }

    /// Counts an exchange with the legacy system that gave no usable answer.
    pub fn upstream_failure(&self, kind: &'static str) {
        self.upstream_failures
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// Counts a refusal of a connection or request.
    pub fn reject(&self, reason: RejectionReason) {
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Records a reload attempt (or the start): its result and when.
    pub fn record_reload(&self, success: bool) {
        self.last_reload_success.set(i64::from(success));
        self.last_reload_timestamp
            .set(crate::tls::inspect::unix_now());
    }

    /// Sets the expiry gauges from freshly loaded TLS material (replacing the old set).
    pub fn record_certificates(&self, tls: &LoadedTls) {
        self.crl_next_update.clear();
        for (_, crl) in &tls.crls {
            if let Some(next) = crl.next_update {
                self.crl_next_update
                    .get_or_create(&IssuerLabel {
                        issuer: crl.issuer.clone(),
                    })
                    .set(next);
            }
        }
        self.certificate_expiry.clear();
        for (i, cert) in tls.server_chain.iter().enumerate() {
            let role = if i == 0 {
                CertRole::server
            } else {
                CertRole::server_chain
            };
            self.certificate_expiry
                .get_or_create(&CertLabel {
                    role,
                    subject: cert.subject.clone(),
                })
                .set(cert.not_after);
        }
        for (_, ca) in &tls.client_cas {
            self.certificate_expiry
                .get_or_create(&CertLabel {
                    role: CertRole::client_ca,
                    subject: ca.subject.clone(),
                })
                .set(ca.not_after);
        }
    }
}
