//! One place for the names of the headers the gateway reads, checks or sets.
//!
//! Two forms: the name as BaRS spells it, for diagnostics (a refusal names the header the way the
//! sender's documentation does), and the pre-parsed lower-case [`HeaderName`] for lookups and
//! inserts (looking up by `&str` parses and lower-cases the name on every request).

use http::HeaderName;

// ---- as BaRS spells them, for diagnostics ------------------------------------------------------

/// `X-Request-Id`: one network request's id (the dedup key).
pub const X_REQUEST_ID: &str = "X-Request-Id";
/// `X-Correlation-Id`: the id of the whole conversation.
pub const X_CORRELATION_ID: &str = "X-Correlation-Id";
/// `NHSD-Target-Identifier`: which service the request is for.
pub const NHSD_TARGET_IDENTIFIER: &str = "NHSD-Target-Identifier";
/// `NHSD-End-User-Organisation`: the sender's organisation (a FHIR Organization).
pub const NHSD_END_USER_ORGANISATION: &str = "NHSD-End-User-Organisation";
/// `NHSD-Requesting-Software`: the sending system (a FHIR Device).
pub const NHSD_REQUESTING_SOFTWARE: &str = "NHSD-Requesting-Software";
/// `NHSD-Requesting-Practitioner`: the user, when known (a FHIR PractitionerRole).
pub const NHSD_REQUESTING_PRACTITIONER: &str = "NHSD-Requesting-Practitioner";
/// `Accept`.
pub const ACCEPT: &str = "Accept";

// ---- the request headers the gateway reads, as lookup keys -------------------------------------

/// `x-request-id`.
pub const REQUEST_ID_KEY: HeaderName = HeaderName::from_static("x-request-id");
/// `x-correlation-id`.
pub const CORRELATION_ID_KEY: HeaderName = HeaderName::from_static("x-correlation-id");
/// `nhsd-target-identifier`.
pub const TARGET_IDENTIFIER_KEY: HeaderName = HeaderName::from_static("nhsd-target-identifier");
/// `nhsd-end-user-organisation`.
pub const END_USER_ORGANISATION_KEY: HeaderName =
    HeaderName::from_static("nhsd-end-user-organisation");
/// `nhsd-requesting-software`.
pub const REQUESTING_SOFTWARE_KEY: HeaderName = HeaderName::from_static("nhsd-requesting-software");
/// `nhsd-requesting-practitioner`.
pub const REQUESTING_PRACTITIONER_KEY: HeaderName =
    HeaderName::from_static("nhsd-requesting-practitioner");

// ---- the headers the gateway sets for the legacy receiver (DESIGN.md §4) -----------------------

/// `x-forwarded-for`: the client address.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`: always `https`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`: never set, removed when a client sends it.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `x-forwarded-port`: never set, removed when a client sends it.
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
/// `x-real-ip`: never set, removed when a client sends it.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `x-client-cert-subject`: the verified client certificate's subject.
pub const X_CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
/// `x-client-cert-sha256`: the verified client certificate's SHA-256 fingerprint.
pub const X_CLIENT_CERT_SHA256: HeaderName = HeaderName::from_static("x-client-cert-sha256");
/// `x-bars-target`: the decoded `NHSD-Target-Identifier`, as `system|value`.
pub const X_BARS_TARGET: HeaderName = HeaderName::from_static("x-bars-target");
/// `x-bars-ods-code`: the sender organisation's ODS code.
pub const X_BARS_ODS_CODE: HeaderName = HeaderName::from_static("x-bars-ods-code");
/// Set on a retry delivered after an uncertain outcome: an earlier attempt with the same
/// X-Request-Id may have been processed (DESIGN.md §5), so the legacy system can deduplicate.
pub const X_BARS_POSSIBLE_DUPLICATE: HeaderName =
    HeaderName::from_static("x-bars-possible-duplicate");
