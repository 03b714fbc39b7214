//! Refusals: every way the gateway answers a request itself, and their one rendering as a FHIR
//! `OperationOutcome` (BaRS error codes, BARS-CONTEXT.md "Errors").

use http::StatusCode;
use serde_json::Value;

use crate::rejection::RejectionReason;

const BAD_REQUEST: &str = "REC_BAD_REQUEST";
const UNAVAILABLE: &str = "REC_SERVICE_UNAVAILABLE";

/// The status a replayed 4xx is answered with: the original's, kept within 4xx.
fn replayed_status(status: u16) -> u16 {
    if (400..500).contains(&status) {
        status
    } else {
        400
    }
}

/// The BaRS code a receiver's 4xx status carries (BARS-CONTEXT.md "Errors"); 400 for the rest.
fn code_of_4xx(status: u16) -> &'static str {
    match status {
        401 => "REC_UNAUTHORIZED",
        403 => "REC_FORBIDDEN",
        404 => "REC_NOT_FOUND",
        405 => "REC_METHOD_NOT_ALLOWED",
        406 => "REC_NOT_ACCEPTABLE",
        409 => "REC_CONFLICT",
        422 => "REC_UNPROCESSABLE_ENTITY",
        _ => BAD_REQUEST,
    }
}

/// The canonical code system of the BaRS HTTP error codes (published examples often write
/// `Codesystem`; the CodeSystem's canonical URL is this one).
pub const ERROR_CODE_SYSTEM: &str = "https://fhir.nhs.uk/CodeSystem/http-error-codes";

/// The UK Core profile the BaRS implementation guide puts in `meta.profile`.
pub const OPERATION_OUTCOME_PROFILE: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-OperationOutcome";

/// A request the gateway answers itself instead of forwarding. Each variant is one BaRS outcome;
/// [`Refusal::outcome`] is their one table and `bars::render` the one place they become wire format
/// (JSON or XML).
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
    /// The legacy system answered with something the gateway cannot pass on: a 101/upgrade, an
    /// oversized response header section, or a broken response (503 REC_SERVICE_UNAVAILABLE /
    /// transient: a BaRS sender retries 503).
    #[error("The receiver answered with an unusable response: {problem}")]
    UpstreamBadResponse {
        /// What was wrong, e.g. `protocol upgrade`.
        problem: &'static str,
    },
    /// A retry of a request the legacy system refused with a deterministic 4xx whose body was too
    /// large to keep for replay (`dedup.max_replay_bytes`): the same status, with the BaRS code
    /// that status has (issue code `processing`).
    #[error("This message was already processed and refused with status {status}; the original answer was too large to keep for replay")]
    ReplayTooLarge {
        /// The original answer's status (a 4xx).
        status: u16,
    },
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

/// What the one table says about a refusal: everything but its diagnostics (its `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The HTTP status.
    pub status: StatusCode,
    /// The BaRS error code (`details.coding[0].code`); its display is `"<status> - <code>"`.
    pub bars_code: &'static str,
    /// The FHIR `issue.code` (IssueType value set).
    pub issue_code: &'static str,
    /// The `reason` label of `bars_gateway_rejections_total` and of the logs.
    pub reason: RejectionReason,
}

impl Refusal {
    /// `MalformedHeader` for `header` (named as BaRS spells it) breaking `problem`.
    pub fn malformed(header: &'static str, problem: &str) -> Refusal {
        Refusal::MalformedHeader {
            header,
            problem: problem.to_owned(),
        }
    }

    /// The refusal table (BARS-CONTEXT.md "Errors", docs/refusals.md §3): one row per variant.
    pub fn outcome(&self) -> Outcome {
        use RejectionReason as R;
        let (status, bars_code, issue_code, reason) = match self {
            Refusal::MissingHeader { .. } => (400, BAD_REQUEST, "invalid", R::MissingHeader),
            Refusal::MalformedHeader { .. } => (400, BAD_REQUEST, "value", R::MalformedHeader),
            Refusal::InvalidRequest(_) => (400, BAD_REQUEST, "invalid", R::InvalidRequest),
            Refusal::NotFound => (404, "REC_NOT_FOUND", "not-found", R::NotFound),
            Refusal::UnknownTarget => (404, "REC_NOT_FOUND", "not-found", R::UnknownTarget),
            Refusal::MethodNotAllowed { .. } => (
                405,
                "REC_METHOD_NOT_ALLOWED",
                "not-supported",
                R::MethodNotAllowed,
            ),
            Refusal::NotAcceptable { .. } => {
                (406, "REC_NOT_ACCEPTABLE", "processing", R::NotAcceptable)
            }
            Refusal::UpstreamTimeout => (408, "REC_TIMEOUT", "timeout", R::UpstreamTimeout),
            Refusal::BodyTimeout => (408, "REC_TIMEOUT", "timeout", R::BodyTimeout),
            Refusal::Duplicate { .. } => (409, "REC_CONFLICT", "duplicate", R::Duplicate),
            Refusal::BodyTooLarge { .. } => (413, BAD_REQUEST, "too-long", R::BodyTooLarge),
            Refusal::IdReused => (422, "REC_UNPROCESSABLE_ENTITY", "invalid", R::IdReused),
            Refusal::InFlight => (425, "REC_TOO_EARLY", "duplicate", R::InFlight),
            Refusal::HeadersTooLarge { .. } => (431, BAD_REQUEST, "too-long", R::HeadersTooLarge),
            Refusal::Internal => (500, "REC_SERVER_ERROR", "exception", R::Internal),
            Refusal::UpstreamUnavailable => (503, UNAVAILABLE, "transient", R::UpstreamUnavailable),
            Refusal::StoreUnavailable => (503, UNAVAILABLE, "transient", R::StoreUnavailable),
            Refusal::UpstreamBadResponse { .. } => {
                (503, UNAVAILABLE, "transient", R::UpstreamBadResponse)
            }
            Refusal::ReplayTooLarge { status } => {
                let status = replayed_status(*status);
                (status, code_of_4xx(status), "processing", R::ReplayTooLarge)
            }
            // Egress (the legacy system as a sender): answers to the legacy system.
            Refusal::EgressTokenRefused { .. } => {
                (502, "REC_SERVER_ERROR", "security", R::EgressTokenRefused)
            }
            Refusal::EgressTokenUnavailable { .. } => {
                (503, UNAVAILABLE, "transient", R::EgressTokenUnavailable)
            }
            Refusal::EgressNoAnswer {
                timed_out: true, ..
            } => (504, "REC_TIMEOUT", "timeout", R::EgressNoAnswer),
            Refusal::EgressNoAnswer { .. } => (503, UNAVAILABLE, "transient", R::EgressNoAnswer),
        };
        Outcome {
            // Every status above is a valid code (ReplayTooLarge's is clamped to 400..=499).
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            bars_code,
            issue_code,
            reason,
        }
    }

    /// The HTTP status of this refusal.
    pub fn status(&self) -> StatusCode {
        self.outcome().status
    }

    /// The BaRS error code (`details.coding[0].code`).
    pub fn bars_code(&self) -> &'static str {
        self.outcome().bars_code
    }

    /// The FHIR `issue.code` (IssueType value set).
    pub fn issue_code(&self) -> &'static str {
        self.outcome().issue_code
    }

    /// A stable, low-cardinality label for `bars_gateway_rejections_total{reason}` and logs.
    pub fn reason(&self) -> &'static str {
        self.outcome().reason.as_str()
    }

    /// The `Allow` header value for a 405, if this is one.
    pub fn allow(&self) -> Option<&str> {
        match self {
            Refusal::MethodNotAllowed { allow } => Some(allow),
            _ => None,
        }
    }

    /// This refusal as a UK Core OperationOutcome in JSON, with a fresh `id`: the value
    /// [`render::operation_outcome`](crate::bars::render::operation_outcome) writes for
    /// [`Format::Json`](crate::bars::render::Format::Json).
    pub fn to_operation_outcome(&self) -> Value {
        crate::bars::render::operation_outcome_json(self)
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
            (Refusal::Internal, 500, "REC_SERVER_ERROR", "exception"),
            (
                Refusal::UpstreamUnavailable,
                503,
                "REC_SERVICE_UNAVAILABLE",
                "transient",
            ),
            (
                Refusal::UpstreamBadResponse {
                    problem: "protocol upgrade",
                },
                503,
                "REC_SERVICE_UNAVAILABLE",
                "transient",
            ),
            (
                Refusal::ReplayTooLarge { status: 422 },
                422,
                "REC_UNPROCESSABLE_ENTITY",
                "processing",
            ),
        ];
        for (refusal, status, code, issue) in table {
            assert_eq!(refusal.status().as_u16(), status, "{refusal:?}");
            assert_eq!(refusal.bars_code(), code, "{refusal:?}");
            assert_eq!(refusal.issue_code(), issue, "{refusal:?}");
        }
    }

    #[test]
    fn the_two_delivery_refusals_read_as_specified() {
        let bad = Refusal::UpstreamBadResponse {
            problem: "protocol upgrade",
        };
        assert_eq!(bad.reason(), "upstream_bad_response");
        assert_eq!(
            bad.to_string(),
            "The receiver answered with an unusable response: protocol upgrade"
        );
        let replay = Refusal::ReplayTooLarge { status: 404 };
        assert_eq!(replay.reason(), "replay_too_large");
        assert_eq!(
            replay.to_string(),
            "This message was already processed and refused with status 404; the original answer \
             was too large to keep for replay"
        );
    }

    #[test]
    fn a_replayed_status_keeps_the_bars_code_that_status_has() {
        let table = [
            (400, "REC_BAD_REQUEST"),
            (401, "REC_UNAUTHORIZED"),
            (403, "REC_FORBIDDEN"),
            (404, "REC_NOT_FOUND"),
            (405, "REC_METHOD_NOT_ALLOWED"),
            (406, "REC_NOT_ACCEPTABLE"),
            (409, "REC_CONFLICT"),
            (410, "REC_BAD_REQUEST"),
            (413, "REC_BAD_REQUEST"),
            (422, "REC_UNPROCESSABLE_ENTITY"),
            (451, "REC_BAD_REQUEST"),
        ];
        for (status, code) in table {
            let refusal = Refusal::ReplayTooLarge { status };
            assert_eq!(refusal.status().as_u16(), status);
            assert_eq!(refusal.bars_code(), code, "{status}");
            assert_eq!(refusal.issue_code(), "processing");
        }
        // Not a 4xx: answered as 400 rather than as a success or a server error.
        assert_eq!(Refusal::ReplayTooLarge { status: 200 }.status(), 400);
        assert_eq!(Refusal::ReplayTooLarge { status: 503 }.status(), 400);
    }

    #[test]
    fn every_reason_label_comes_from_the_one_enum() {
        let refusal = Refusal::NotFound;
        assert_eq!(refusal.outcome().reason, RejectionReason::NotFound);
        assert_eq!(refusal.reason(), RejectionReason::NotFound.as_str());
    }
}
