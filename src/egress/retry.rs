//! The BaRS sender's retry rules (BARS-CONTEXT.md "Retries"), as pure decisions: which answers are
//! retried, how long to wait, when to stop. The loop that applies them is in `egress/mod.rs`.
//!
//! Retried: 408, 425, 429, 503, 504, connection failures and timeouts, and answers that lack the
//! ids or (on an error status) an OperationOutcome: the spec says such an answer did not come from
//! a BaRS receiver. Never retried: 409 (duplicate: it was delivered) and every other 4xx.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::settings::RetrySettings;

/// What to do with one attempt's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Give this answer to the legacy system.
    Final,
    /// Try again with the same ids, after at least `retry_after` when the answer said so.
    Retry {
        /// The answer's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
}

/// Judges an HTTP answer. `is_operation_outcome` is whether an error answer's body is a FHIR
/// OperationOutcome (ignored for 2xx/3xx).
pub(crate) fn judge(
    status: StatusCode,
    headers: &HeaderMap,
    is_operation_outcome: bool,
) -> Verdict {
    let retry = Verdict::Retry {
        retry_after: retry_after(headers),
    };
    match status.as_u16() {
        // Delivered already: a retry would only earn another 409.
        409 => Verdict::Final,
        408 | 425 | 429 | 503 | 504 => retry,
        _ if !headers.contains_key("x-request-id") || !headers.contains_key("x-correlation-id") => {
            retry
        }
        400.. if !is_operation_outcome => retry,
        _ => Verdict::Final,
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The wait before retry number `retry` (1 = the first retry): exponential from
/// `initial_backoff`, capped at `max_backoff`, with "equal jitter" (a random point in the upper
/// half) so that senders failed by one outage do not all come back at once; never shorter than the
/// answer's `Retry-After`.
pub(crate) fn backoff(
    policy: &RetrySettings,
    retry: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = retry.saturating_sub(1).min(16);
    let base = policy
        .initial_backoff
        .saturating_mul(1u32 << exponent)
        .min(policy.max_backoff);
    let jittered = base / 2 + base.mul_f64(0.5 * random_fraction());
    jittered.max(retry_after.unwrap_or_default())
}

fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "a".parse().unwrap());
        h.insert("x-correlation-id", "b".parse().unwrap());
        h
    }

    #[test]
    fn the_bars_retry_statuses_are_retried_and_409_and_other_4xx_are_not() {
        for s in [408, 425, 429, 503, 504] {
            let v = judge(StatusCode::from_u16(s).unwrap(), &ids(), true);
            assert!(matches!(v, Verdict::Retry { .. }), "{s}");
        }
        for s in [200, 201, 400, 401, 404, 409, 422, 500] {
            assert_eq!(
                judge(StatusCode::from_u16(s).unwrap(), &ids(), true),
                Verdict::Final,
                "{s}"
            );
        }
        // 409 even without ids or an OperationOutcome: it means delivered.
        assert_eq!(
            judge(StatusCode::CONFLICT, &HeaderMap::new(), false),
            Verdict::Final
        );
    }

    #[test]
    fn answers_without_ids_or_operation_outcome_are_retried() {
        assert!(matches!(
            judge(StatusCode::OK, &HeaderMap::new(), false),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            judge(StatusCode::BAD_REQUEST, &ids(), false),
            Verdict::Retry { .. }
        ));
        assert_eq!(judge(StatusCode::OK, &ids(), false), Verdict::Final);
    }

    #[test]
    fn retry_after_and_backoff() {
        let mut h = ids();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert("retry-after", date.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        let policy = RetrySettings {
            max_attempts: 4,
            retry_budget: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        };
        for retry in 1..10 {
            let b = backoff(&policy, retry, None);
            let full = Duration::from_millis(500 * (1 << (retry - 1))).min(Duration::from_secs(8));
            assert!(b >= full / 2 && b <= full, "retry {retry}: {b:?}");
        }
        assert_eq!(
            backoff(&policy, 1, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
    }
}
