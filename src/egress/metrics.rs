//! Egress metrics, registered in the gateway's registry (prefix `bars_gateway_`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{ResultLabel, StatusLabel};

/// The egress side's metrics. Never a token, an id or a target in a label.
#[derive(Debug)]
pub(crate) struct EgressMetrics {
    /// Answers given to the legacy system, by status.
    pub requests: Family<StatusLabel, Counter>,
    /// Attempts made per egress request.
    pub attempts: Histogram,
    /// Token requests to the NHS API platform, by result (`success` | `failure`).
    pub token_fetches: Family<ResultLabel, Counter>,
    /// Age in seconds of the access token used by the latest request.
    pub token_age: Gauge,
}

impl EgressMetrics {
    /// Creates the families and registers them in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> EgressMetrics {
        let m = EgressMetrics {
            requests: Family::default(),
            attempts: Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]),
            token_fetches: Family::default(),
            token_age: Gauge::default(),
        };
        registry.register(
            "egress_requests",
            "Egress requests answered to the legacy system, by HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "egress_attempts",
            "Attempts made to the BaRS API per egress request",
            m.attempts.clone(),
        );
        registry.register(
            "egress_token_fetches",
            "Access token requests to the NHS API platform, by result",
            m.token_fetches.clone(),
        );
        registry.register_with_unit(
            "egress_token_age",
            "Age of the access token used by the latest egress request",
            prometheus_client::registry::Unit::Seconds,
            m.token_age.clone(),
        );
        for result in ["success", "failure"] {
            let _ = m.token_fetches.get_or_create(&ResultLabel { result });
        }
        m
    }

    /// Counts one token request.
    pub(crate) fn token_fetch(&self, result: &'static str) {
        self.token_fetches
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}
