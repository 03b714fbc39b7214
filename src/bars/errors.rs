//! Refusals: every way the gateway answers a request itself, and their one rendering as a FHIR
//! `OperationOutcome` (BaRS error codes, BARS-CONTEXT.md "Errors").

use http::StatusCode;
use serde_json::{json, Value};

/// The canonical code system of the BaRS HTTP error codes (published examples often write
/// `Codesystem`; the CodeSystem's canonical URL is this one).
pub const ERROR_CODE_SYSTEM: &str = "https://fhir.nhs.uk/CodeSystem/http-error-codes";

/// The UK Core profile the BaRS implementation guide puts in `meta.profile`.
pub const OPERATION_OUTCOME_PROFILE: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-OperationOutcome";

/// A request the gateway answers itself instead of forwarding. Each variant is one BaRS outcome;
/// [`Refusal::to_operation_outcome`] is the only place they become wire format.
///
/// Diagnostics are short, name the header or rule, and never echo decoded header content, bodies or
/// patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A required header is absent (400 REC_BAD_REQUEST / invalid).
    #[error("{header} header is missing")]
    MissingHeader {
        /// The header's canonical name, e.g. `X-Request-Id`.
        header: &'static str,
    },
    /// A header is present but its value is malformed (400 REC_BAD_REQUEST / value).
    #[error("{header} header is malformed: {problem}")]
    MalformedHeader {
        /// The header's canonical name.
        header: &'static str,
        /// What is wrong, without echoing the value.
        problem: String,
    },
    /// The request itself is not acceptable (400 REC_BAD_REQUEST / invalid): path or framing.
    #[error("{0}")]
    InvalidRequest(String),
    /// Access control on the identity headers refused the caller (401 REC_UNAUTHORIZED / security).
    #[error("{0}")]
    Unauthorized(String),
    /// No client identity reached the request (403 REC_FORBIDDEN / forbidden); TLS-MA failures
    /// normally end in the handshake and never get this far.
    #[error("TLS-MA failure")]
    Forbidden,
    /// Unknown path (404 REC_NOT_FOUND / not-found).
    #[error("No BaRS endpoint at this path")]
    NotFound,
    /// No upstream serves the NHSD-Target-Identifier (404 REC_NOT_FOUND / not-found).
    #[error("No service is registered here for this NHSD-Target-Identifier")]
    UnknownTarget,
    /// Known path, wrong method (405 REC_METHOD_NOT_ALLOWED / not-supported) with `Allow`.
    #[error("Method not allowed on this endpoint; allowed: {allow}")]
    MethodNotAllowed {
        /// The value of the `Allow` header, e.g. `POST` or `GET, POST`.
        allow: String,
    },
    /// The `Accept` header asks for a major version this receiver does not serve
    /// (406 REC_NOT_ACCEPTABLE / processing).
    #[error("Accept asks for an unsupported version; supported major versions: {supported}")]
    NotAcceptable {
        /// The supported major versions, e.g. `1`.
        supported: String,
    },
    /// The upstream did not answer within `upstream.request_timeout` (408 REC_TIMEOUT / timeout).
    #[error("The receiver did not respond in time")]
    UpstreamTimeout,
    /// The client did not send the whole request body within `upstream.request_timeout`
    /// (408 REC_TIMEOUT / timeout): nothing was forwarded, the sender may retry.
    #[error("The request body was not received in time")]
    BodyTimeout,
    /// The request header section is larger than `listen.max_header_bytes`
    /// (431 REC_BAD_REQUEST / too-long).
    #[error("Request header section exceeds the limit of {limit} bytes")]
    HeadersTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A retry of a request already processed (409 REC_CONFLICT / duplicate).
    #[error("This message has already been received and processed{}", reference_suffix(.reference))]
    Duplicate {
        /// The reference id the receiver created (from the original response's `Location`).
        reference: Option<String>,
    },
    /// The body is larger than `upstream.max_body` (413 REC_BAD_REQUEST / too-long).
    #[error("Request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit in bytes.
        limit: u64,
    },
    /// An X-Request-Id reused for different content (422 REC_UNPROCESSABLE_ENTITY / invalid).
    #[error("X-Request-Id already used for a different request")]
    IdReused,
    /// A retry while the original is still being processed (425 REC_TOO_EARLY / duplicate).
    #[error("This message is still being processed")]
    InFlight,
    /// Rate limited (429 REC_TOO_MANY_REQUESTS / throttled).
    #[error("Too many requests")]
    Throttled,
    /// An unexpected gateway failure (500 REC_SERVER_ERROR / exception).
    #[error("Internal error in the gateway")]
    Internal,
    /// The upstream could not be reached or failed mid-answer (503 REC_SERVICE_UNAVAILABLE / transient).
    #[error("The receiver is unavailable")]
    UpstreamUnavailable,
    /// The dedup store could not be consulted (503 REC_SERVICE_UNAVAILABLE / transient), so the
    /// sender retries instead of risking a double delivery.
    #[error("The receiver cannot check for duplicates right now")]
    StoreUnavailable,
    /// Egress: the NHS API platform refused the gateway's signed JWT (502 REC_SERVER_ERROR /
    /// security): a configuration problem (key, kid, API key) for the operator, not a retry.
    #[error("The NHS API platform refused the gateway's credentials: {cause}")]
    EgressTokenRefused {
        /// The platform's `error`, `error_description` and `message_id`.
        cause: String,
    },
    /// Egress: no access token could be had (503 REC_SERVICE_UNAVAILABLE / transient).
    #[error("No access token from the NHS API platform: {cause}")]
    EgressTokenUnavailable {
        /// Why (unreachable, timeout, malformed answer).
        cause: String,
    },
    /// Egress: the BaRS API gave no answer within the retry rules (504 REC_TIMEOUT / timeout when
    /// the last attempt timed out, else 503 REC_SERVICE_UNAVAILABLE / transient).
    #[error("The BaRS API did not answer after {attempts} attempt(s): {cause}")]
    EgressNoAnswer {
        /// Attempts made.
        attempts: u32,
        /// Whether the last attempt timed out (504) rather than failed to connect (503).
        timed_out: bool,
        /// The last failure.
        cause: String,
    },
}

fn reference_suffix(reference: &Option<String>) -> String {
    match reference {
        Some(id) => format!(". Reference ID: {id}"),
        None => String::new(),
    }
}

impl Refusal {
    /// The HTTP status of this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::MissingHeader { .. }
            | Refusal::MalformedHeader { .. }
            | Refusal::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden => StatusCode::FORBIDDEN,
            Refusal::NotFound | Refusal::UnknownTarget => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            Refusal::UpstreamTimeout | Refusal::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Duplicate { .. } => StatusCode::CONFLICT,
            Refusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::IdReused => StatusCode::UNPROCESSABLE_ENTITY,
            Refusal::InFlight => StatusCode::TOO_EARLY,
            Refusal::Throttled => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::UpstreamUnavailable | Refusal::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::EgressTokenRefused { .. } => StatusCode::BAD_GATEWAY,
            Refusal::EgressTokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::EgressNoAnswer {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::EgressNoAnswer { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The BaRS error code (`details.coding[0].code`).
    pub fn bars_code(&self) -> &'static str {
        match self {
            Refusal::MissingHeader { .. }
            | Refusal::MalformedHeader { .. }
            | Refusal::InvalidRequest(_)
            | Refusal::BodyTooLarge { .. }
            | Refusal::HeadersTooLarge { .. } => "REC_BAD_REQUEST",
            Refusal::Unauthorized(_) => "REC_UNAUTHORIZED",
            Refusal::Forbidden => "REC_FORBIDDEN",
            Refusal::NotFound | Refusal::UnknownTarget => "REC_NOT_FOUND",
            Refusal::MethodNotAllowed { .. } => "REC_METHOD_NOT_ALLOWED",
            Refusal::NotAcceptable { .. } => "REC_NOT_ACCEPTABLE",
            Refusal::UpstreamTimeout | Refusal::BodyTimeout => "REC_TIMEOUT",
            Refusal::Duplicate { .. } => "REC_CONFLICT",
            Refusal::IdReused => "REC_UNPROCESSABLE_ENTITY",
            Refusal::InFlight => "REC_TOO_EARLY",
            Refusal::Throttled => "REC_TOO_MANY_REQUESTS",
            Refusal::Internal => "REC_SERVER_ERROR",
            Refusal::UpstreamUnavailable | Refusal::StoreUnavailable => "REC_SERVICE_UNAVAILABLE",
            Refusal::EgressTokenRefused { .. } => "REC_SERVER_ERROR",
            Refusal::EgressTokenUnavailable { .. } => "REC_SERVICE_UNAVAILABLE",
            Refusal::EgressNoAnswer {
                timed_out: true, ..
            } => "REC_TIMEOUT",
            Refusal::EgressNoAnswer { .. } => "REC_SERVICE_UNAVAILABLE",
        }
    }

    /// The FHIR `issue.code` (IssueType value set).
    pub fn issue_code(&self) -> &'static str {
        match self {
            Refusal::MissingHeader { .. } | Refusal::InvalidRequest(_) | Refusal::IdReused => {
                "invalid"
            }
            Refusal::MalformedHeader { .. } => "value",
            Refusal::Unauthorized(_) => "security",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound | Refusal::UnknownTarget => "not-found",
            Refusal::MethodNotAllowed { .. } => "not-supported",
            Refusal::NotAcceptable { .. } => "processing",
            Refusal::UpstreamTimeout | Refusal::BodyTimeout => "timeout",
            Refusal::Duplicate { .. } | Refusal::InFlight => "duplicate",
            Refusal::BodyTooLarge { .. } | Refusal::HeadersTooLarge { .. } => "too-long",
            Refusal::Throttled => "throttled",
            Refusal::Internal => "exception",
            Refusal::UpstreamUnavailable | Refusal::StoreUnavailable => "transient",
            Refusal::EgressTokenRefused { .. } => "security",
            Refusal::EgressTokenUnavailable { .. } => "transient",
            Refusal::EgressNoAnswer {
                timed_out: true, ..
            } => "timeout",
            Refusal::EgressNoAnswer { .. } => "transient",
        }
    }

    /// A stable, low-cardinality label for `bars_gateway_rejections_total{reason}` and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MissingHeader { .. } => "missing_header",
            Refusal::MalformedHeader { .. } => "malformed_header",
            Refusal::InvalidRequest(_) => "invalid_request",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::UnknownTarget => "unknown_target",
            Refusal::MethodNotAllowed { .. } => "method_not_allowed",
            Refusal::NotAcceptable { .. } => "not_acceptable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::HeadersTooLarge { .. } => "headers_too_large",
            Refusal::Duplicate { .. } => "duplicate",
            Refusal::BodyTooLarge { .. } => "body_too_large",
            Refusal::IdReused => "id_reused",
            Refusal::InFlight => "in_flight",
            Refusal::Throttled => "throttled",
            Refusal::Internal => "internal",
            Refusal::UpstreamUnavailable => "upstream_unavailable",
            Refusal::StoreUnavailable => "store_unavailable",
            Refusal::EgressTokenRefused { .. } => "egress_token_refused",
            Refusal::EgressTokenUnavailable { .. } => "egress_token_unavailable",
            Refusal::EgressNoAnswer { .. } => "egress_no_answer",
        }
    }

    /// The `Allow` header value for a 405, if this is one.
    pub fn allow(&self) -> Option<&str> {
        match self {
            Refusal::MethodNotAllowed { allow } => Some(allow),
            _ => None,
        }
    }

    /// Renders this refusal as a UK Core OperationOutcome with a fresh `id`. This is the one place
    /// a refusal becomes wire format.
    pub fn to_operation_outcome(&self) -> Value {
        let status = self.status();
        let code = self.bars_code();
        json!({
            "resourceType": "OperationOutcome",
            "id": uuid::Uuid::new_v4().to_string(),
            "meta": { "profile": [OPERATION_OUTCOME_PROFILE] },
            "issue": [{
                "severity": "error",
                "code": self.issue_code(),
                "details": { "coding": [{
                    "system": ERROR_CODE_SYSTEM,
                    "code": code,
                    "display": format!("{} - {}", status.as_u16(), code),
                }]},
                "diagnostics": self.to_string(),
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_renders_like_the_bars_example() {
        let oo = Refusal::Duplicate { reference: None }.to_operation_outcome();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["meta"]["profile"][0], OPERATION_OUTCOME_PROFILE);
        let issue = &oo["issue"][0];
        assert_eq!(issue["severity"], "error");
        assert_eq!(issue["code"], "duplicate");
        let coding = &issue["details"]["coding"][0];
        assert_eq!(coding["system"], ERROR_CODE_SYSTEM);
        assert_eq!(coding["code"], "REC_CONFLICT");
        assert_eq!(coding["display"], "409 - REC_CONFLICT");
        assert_eq!(
            issue["diagnostics"],
            "This message has already been received and processed"
        );
        assert!(uuid::Uuid::parse_str(oo["id"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn duplicate_names_the_reference_id_when_known() {
        let r = Refusal::Duplicate {
            reference: Some("ID-12345".into()),
        };
        assert_eq!(
            r.to_string(),
            "This message has already been received and processed. Reference ID: ID-12345"
        );
    }

    #[test]
    fn each_outcome_has_the_code_pair_of_the_bars_table() {
        let table = [
            (
                Refusal::MissingHeader {
                    header: "X-Request-Id",
                },
                400,
                "REC_BAD_REQUEST",
                "invalid",
            ),
            (
                Refusal::MalformedHeader {
                    header: "X-Request-Id",
                    problem: "not a UUID".into(),
                },
                400,
                "REC_BAD_REQUEST",
                "value",
            ),
            (
                Refusal::Unauthorized("no".into()),
                401,
                "REC_UNAUTHORIZED",
                "security",
            ),
            (Refusal::Forbidden, 403, "REC_FORBIDDEN", "forbidden"),
            (Refusal::NotFound, 404, "REC_NOT_FOUND", "not-found"),
            (
                Refusal::MethodNotAllowed {
                    allow: "POST".into(),
                },
                405,
                "REC_METHOD_NOT_ALLOWED",
                "not-supported",
            ),
            (
                Refusal::NotAcceptable {
                    supported: "1".into(),
                },
                406,
                "REC_NOT_ACCEPTABLE",
                "processing",
            ),
            (Refusal::UpstreamTimeout, 408, "REC_TIMEOUT", "timeout"),
            (
                Refusal::Duplicate { reference: None },
                409,
                "REC_CONFLICT",
                "duplicate",
            ),
            (
                Refusal::BodyTooLarge { limit: 1 },
                413,
                "REC_BAD_REQUEST",
                "too-long",
            ),
            (
                Refusal::IdReused,
                422,
                "REC_UNPROCESSABLE_ENTITY",
                "invalid",
            ),
            (Refusal::InFlight, 425, "REC_TOO_EARLY", "duplicate"),
            (
                Refusal::Throttled,
                429,
                "REC_TOO_MANY_REQUESTS",
                "throttled",
            ),
            (Refusal::Internal, 500, "REC_SERVER_ERROR", "exception"),
            (
                Refusal::UpstreamUnavailable,
                503,
                "REC_SERVICE_UNAVAILABLE",
                "transient",
            ),
        ];
        for (refusal, status, code, issue) in table {
            assert_eq!(refusal.status().as_u16(), status, "{refusal:?}");
            assert_eq!(refusal.bars_code(), code, "{refusal:?}");
            assert_eq!(refusal.issue_code(), issue, "{refusal:?}");
        }
    }
}
