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
        };
        for kind in UPSTREAM_FAILURE_KINDS {
            drop(m.upstream_failures.get_or_create(&KindLabel { kind }));
        }
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

    /// Sets the expiry gauges from freshly loaded TLS material (replacing the old set).
    pub fn record_certificates(&self, tls: &LoadedTls) {
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
