//! Identity headers the gateway forwards although their shape is unexpected (DESIGN.md §5a): the
//! BaRS proxy forwards them without a look, so by default the gateway does too, and only counts
//! them (`bars_gateway_identity_header_warnings_total{header,problem}`) and logs them at most once
//! a minute. Strict mode (`bars.require_identity_headers = true`) refuses them instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::bars::ids::RequestId;
use crate::metrics::{IdentityWarningLabel, Metrics};

crate::rejection::label_enum! {
    /// What is unexpected about an identity header that decoded to JSON: the `problem` label.
    pub enum ShapeProblem {
        /// The JSON is an array, a string, a number or null.
        NotAnObject => "not_an_object",
        /// A JSON field appears twice, so which copy the legacy system reads is unknown.
        DuplicateField => "duplicate_field",
        /// `resourceType` is present but not the resource the header should carry.
        WrongResourceType => "wrong_resource_type",
        /// `identifier` is absent, or neither an array nor an object of `system`/`value` strings or
        /// numbers.
        BadIdentifier => "bad_identifier",
        /// No identifier entry has a value (Software, Practitioner).
        NoIdentifierValue => "no_identifier_value",
        /// NHSD-Target-Identifier has no non-empty `system` string.
        NoSystem => "no_system",
        /// NHSD-Target-Identifier has no non-empty `value` string or number.
        NoValue => "no_value",
        /// NHSD-Target-Identifier's `system` contains `|` (ambiguous as `system|value`).
        PipeInSystem => "pipe_in_system",
        /// A value the gateway would forward contains control characters.
        ControlCharacters => "control_characters",
        /// NHSD-End-User-Organisation has no (non-empty) ODS organisation code.
        NoOdsCode => "no_ods_code",
        /// NHSD-End-User-Organisation has two different ODS organisation codes.
        SeveralOdsCodes => "several_ods_codes",
    }
}

/// One identity header forwarded with an unexpected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityWarning {
    /// The header's canonical name, e.g. `NHSD-End-User-Organisation`.
    pub header: &'static str,
    /// What was unexpected.
    pub problem: ShapeProblem,
}

/// Counts identity header warnings and lets one log line through per interval, whatever the
/// header or problem: a sender with an odd encoder sends the same odd header on every request,
/// and the counter has the numbers.
#[derive(Debug)]
pub struct WarningReporter {
    started: Instant,
    interval_ms: u64,
    /// Milliseconds since `started` at which the next line may be written.
    next_ms: AtomicU64,
}

impl WarningReporter {
    /// One line per `interval`.
    pub fn new(interval: std::time::Duration) -> WarningReporter {
        WarningReporter {
            started: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
        }
    }

    /// Counts each of a request's warnings in
    /// `bars_gateway_identity_header_warnings_total{header,problem}` and logs the first, unless a
    /// line was written less than an interval ago.
    pub fn report(&self, metrics: &Metrics, warnings: &[IdentityWarning], request_id: &RequestId) {
        for warning in warnings {
            metrics
                .identity_header_warnings
                .get_or_create(&IdentityWarningLabel {
                    header: warning.header,
                    problem: warning.problem.as_str(),
                })
                .inc();
        }
        if let Some(first) = warnings.first() {
            if self.should_log(Instant::now()) {
                tracing::warn!(
                    request_id = %request_id,
                    header = first.header,
                    problem = first.problem.as_str(),
                    "identity header forwarded with an unexpected shape (counted in bars_gateway_identity_header_warnings_total; logged at most once a minute)"
                );
            }
        }
    }

    /// Whether a line may be written at `now` (true at most once per interval).
    fn should_log(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_line_per_interval() {
        let limiter = WarningReporter::new(Duration::from_secs(60));
        let t0 = limiter.started;
        assert!(limiter.should_log(t0));
        assert!(!limiter.should_log(t0 + Duration::from_secs(1)));
        assert!(!limiter.should_log(t0 + Duration::from_secs(59)));
        assert!(limiter.should_log(t0 + Duration::from_secs(60)));
        assert!(!limiter.should_log(t0 + Duration::from_secs(61)));
    }

    #[test]
    fn problem_labels_are_distinct() {
        let labels: std::collections::BTreeSet<&str> =
            ShapeProblem::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(labels.len(), ShapeProblem::ALL.len());
    }
}
