//! Identity headers: decodes and validates the four Base64-JSON `NHSD-*` headers (BARS-CONTEXT.md
//! "Headers on requests that reach a receiver").
//!
//! The BaRS proxy checks none of them, so the gateway is the first to. Each header goes through the
//! same steps, each with its own diagnostic: length bound, standard Base64 (padding optional),
//! UTF-8, a nesting bound, JSON, then the shape of its FHIR resource. Diagnostics name the header
//! and the rule broken, never the decoded content.
//!
//! The JSON is read into small typed structs whose fields accept *any* JSON value and record what
//! they saw (see `Text`, `Kind`, `Array`, `Object` in `wire.rs`); no `serde_json::Value` tree is
//! built, strings are borrowed from the decode buffer, and the shape rules can then say precisely
//! what is wrong instead of relaying serde's messages (which can quote the offending value).
//!
//! Files: this one holds the public types and the order of the steps; `wire.rs` the bytes-to-JSON
//! decoding (length, Base64, UTF-8, nesting, the typed structs and their serde visitors);
//! `rules.rs` the shape rules of each header; `memo.rs` the per-thread memo of values already
//! decoded cleanly.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::bars::errors::Refusal;
use crate::bars::warnings::{IdentityWarning, ShapeProblem};

mod memo;
mod rules;
#[cfg(test)]
mod tests;
mod wire;

use memo::{memoised, ORGANISATION_MEMO, PRACTITIONER_MEMO, SOFTWARE_MEMO, TARGET_MEMO};
use rules::{decode_organisation, decode_practitioner, decode_software, decode_target};

use crate::bars::headers::{
    END_USER_ORGANISATION_KEY, REQUESTING_PRACTITIONER_KEY, REQUESTING_SOFTWARE_KEY,
    TARGET_IDENTIFIER_KEY,
};
pub use crate::bars::headers::{
    NHSD_END_USER_ORGANISATION, NHSD_REQUESTING_PRACTITIONER, NHSD_REQUESTING_SOFTWARE,
    NHSD_TARGET_IDENTIFIER,
};

/// A header's lookup key (pre-parsed: looking up by `&str` parses and lower-cases the name on
/// every request) and its name as diagnostics spell it.
struct Header {
    key: HeaderName,
    name: &'static str,
}

static TARGET: Header = Header {
    key: TARGET_IDENTIFIER_KEY,
    name: NHSD_TARGET_IDENTIFIER,
};
static ORGANISATION: Header = Header {
    key: END_USER_ORGANISATION_KEY,
    name: NHSD_END_USER_ORGANISATION,
};
static SOFTWARE: Header = Header {
    key: REQUESTING_SOFTWARE_KEY,
    name: NHSD_REQUESTING_SOFTWARE,
};
static PRACTITIONER: Header = Header {
    key: REQUESTING_PRACTITIONER_KEY,
    name: NHSD_REQUESTING_PRACTITIONER,
};

/// The identifier system of an ODS organisation code (BaRS Organization identifier).
pub const ODS_ORGANIZATION_CODE_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// The service a request is addressed to, e.g. `https://fhir.nhs.uk/Id/dos-service-id|2000011147`.
/// It selects the upstream (`[[upstream.route]] target`) and is forwarded as `X-BaRS-Target`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetIdentifier {
    /// The identifier system (a URI; never contains `|`).
    pub system: String,
    /// The identifier value, e.g. a DoS service id.
    pub value: String,
}

impl fmt::Display for TargetIdentifier {
    /// `system|value`, the FHIR token-search form the config's route keys use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}", self.system, self.value)
    }
}

/// A config route key that is not `system|value` with both parts non-empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected \"system|value\" with both parts non-empty and no control characters")]
pub struct InvalidTargetIdentifier;

impl FromStr for TargetIdentifier {
    type Err = InvalidTargetIdentifier;

    /// Parses `system|value`, splitting at the first `|` (a URI system cannot contain one).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (system, value) = text.split_once('|').ok_or(InvalidTargetIdentifier)?;
        let acceptable =
            |part: &str| !part.trim().is_empty() && !part.chars().any(char::is_control);
        if !acceptable(system) || !acceptable(value) {
            return Err(InvalidTargetIdentifier);
        }
        Ok(TargetIdentifier {
            system: system.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// An ODS organisation code, e.g. `A1001`; forwarded as `X-BaRS-Ods-Code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OdsCode(pub String);

impl OdsCode {
    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OdsCode {
    /// The code as sent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the gateway keeps of `NHSD-End-User-Organisation`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndUserOrganisation {
    /// The sender organisation's ODS code.
    pub ods_code: OdsCode,
}

/// What the gateway keeps of `NHSD-Requesting-Software`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestingSoftware {
    /// The first identifier with a value, as `system|value` (or `value` when it has no system).
    /// Always `Some` after validation, which requires such an identifier.
    pub id: Option<String>,
}

/// The decoded identity headers of one request; `None` where a header was absent (or, in the
/// default lenient mode, present with an unexpected shape: see `warnings`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// `NHSD-Target-Identifier`.
    pub target: Option<TargetIdentifier>,
    /// `NHSD-End-User-Organisation`.
    pub organisation: Option<EndUserOrganisation>,
    /// `NHSD-Requesting-Software`.
    pub software: Option<RequestingSoftware>,
    /// Whether a valid `NHSD-Requesting-Practitioner` was sent (validated, never passed on).
    pub practitioner_present: bool,
    /// Headers forwarded although their shape is unexpected (lenient mode only; empty in strict
    /// mode, which refuses them). An empty `Vec` does not allocate.
    pub warnings: Vec<IdentityWarning>,
}

/// Which identity headers an endpoint requires (see `Endpoint::identity_requirements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityRequirements {
    /// `NHSD-Target-Identifier` must be present.
    pub target: bool,
    /// `NHSD-End-User-Organisation` must be present.
    pub organisation: bool,
    /// `NHSD-Requesting-Software` must be present.
    pub software: bool,
}

/// How the identity headers of a request are read (DESIGN.md §5a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// Which headers must be present.
    pub required: IdentityRequirements,
    /// Strict mode (`bars.require_identity_headers = true`): every shape rule refuses (400), and
    /// only the canonical forms are read. Otherwise (the default, as lenient as the BaRS proxy)
    /// a header that decodes to a JSON object of an unexpected shape is forwarded untouched and
    /// reported in [`IdentityHeaders::warnings`], and the forms the proxy routes are read too:
    /// numeric values, `identifier` as a single object, the ODS system spelt with `http://` or
    /// `organisation`, no `resourceType`.
    pub strict: bool,
    /// The gateway routes by NHSD-Target-Identifier, so a target it cannot read is refused even in
    /// lenient mode.
    pub target_needed: bool,
}

/// Decodes and validates the four identity headers in strict mode: a required one that is absent
/// is refused with `MissingHeader`, and any one present is always validated (`MalformedHeader`
/// when wrong). `NHSD-Requesting-Practitioner` is never required (BARS-CONTEXT.md: optional).
pub fn decode_identity_headers(
    headers: &HeaderMap,
    required: IdentityRequirements,
) -> Result<IdentityHeaders, Refusal> {
    read_identity_headers(
        headers,
        IdentityPolicy {
            required,
            strict: true,
            target_needed: true,
        },
    )
}

/// Reads the four identity headers under `policy`. Whatever the mode, a required header that is
/// absent is `MissingHeader`, and a present one that is not Base64 of a JSON text (or is sent
/// twice, too long, nested too deeply) is `MalformedHeader`.
pub fn read_identity_headers(
    headers: &HeaderMap,
    policy: IdentityPolicy,
) -> Result<IdentityHeaders, Refusal> {
    let strict = policy.strict;
    let mut warnings = Vec::new();
    let read = |header: &Header, required: bool| single_value(headers, header, required);
    let target = match read(&TARGET, policy.required.target)? {
        Some(v) => settle(
            &TARGET,
            memoised(&TARGET_MEMO, v, strict, decode_target),
            strict || policy.target_needed,
            &mut warnings,
        )?,
        None => None,
    };
    let organisation = match read(&ORGANISATION, policy.required.organisation)? {
        Some(v) => settle(
            &ORGANISATION,
            memoised(&ORGANISATION_MEMO, v, strict, decode_organisation),
            strict,
            &mut warnings,
        )?,
        None => None,
    };
    let software = match read(&SOFTWARE, policy.required.software)? {
        Some(v) => settle(
            &SOFTWARE,
            memoised(&SOFTWARE_MEMO, v, strict, decode_software),
            strict,
            &mut warnings,
        )?,
        None => None,
    };
    let practitioner_present = match read(&PRACTITIONER, false)? {
        Some(v) => settle(
            &PRACTITIONER,
            memoised(&PRACTITIONER_MEMO, v, strict, decode_practitioner),
            strict,
            &mut warnings,
        )?
        .is_some(),
        None => false,
    };
    Ok(IdentityHeaders {
        target,
        organisation,
        software,
        practitioner_present,
        warnings,
    })
}

/// A decoder's answer as the value kept: undecodable is refused; an unexpected shape is refused
/// when `refuse_shape`, else recorded as a warning and nothing is kept (so no `X-BaRS-*` header
/// is derived from it).
fn settle<T>(
    header: &Header,
    decoded: Result<T, Problem>,
    refuse_shape: bool,
    warnings: &mut Vec<IdentityWarning>,
) -> Result<Option<T>, Refusal> {
    match decoded {
        Ok(value) => Ok(Some(value)),
        Err(Problem::Refused(refusal)) => Err(refusal),
        Err(Problem::Shape(shape)) if refuse_shape => {
            Err(Refusal::malformed(header.name, &shape.detail))
        }
        Err(Problem::Shape(shape)) => {
            warnings.push(IdentityWarning {
                header: header.name,
                problem: shape.problem,
            });
            Ok(None)
        }
    }
}

/// Why a header value was not read: refused whatever the mode, or an unexpected shape.
enum Problem {
    Refused(Refusal),
    Shape(Shape),
}

/// An unexpected shape: its label, and the diagnostic strict mode refuses it with.
struct Shape {
    problem: ShapeProblem,
    detail: Cow<'static, str>,
}

impl From<Shape> for Problem {
    fn from(shape: Shape) -> Problem {
        Problem::Shape(shape)
    }
}

fn shape(problem: ShapeProblem, detail: impl Into<Cow<'static, str>>) -> Shape {
    Shape {
        problem,
        detail: detail.into(),
    }
}

/// A refusal in every mode (not Base64, not JSON), or a strict-only rule on a field the gateway
/// never reads.
fn refused(header: &'static str, problem: &str) -> Problem {
    Problem::Refused(Refusal::malformed(header, problem))
}

/// The header's only value; absent is `MissingHeader` when required. A header sent twice is refused:
/// which copy the legacy system would read is unknown, so either choice could bypass a check.
fn single_value<'h>(
    headers: &'h HeaderMap,
    header: &Header,
    required: bool,
) -> Result<Option<&'h HeaderValue>, Refusal> {
    let mut values = headers.get_all(&header.key).iter();
    match (values.next(), values.next()) {
        (None, _) if required => Err(Refusal::MissingHeader {
            header: header.name,
        }),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(Refusal::malformed(header.name, "sent more than once")),
        (Some(value), None) => Ok(Some(value)),
    }
}
