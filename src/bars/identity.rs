//! Identity headers: decodes and validates the four Base64-JSON `NHSD-*` headers (BARS-CONTEXT.md
//! "Headers on requests that reach a receiver").
//!
//! The BaRS proxy checks none of them, so the gateway is the first to. Each header goes through the
//! same steps, each with its own diagnostic: length bound, standard Base64 (padding optional),
//! UTF-8, a nesting bound, JSON, then the shape of its FHIR resource. Diagnostics name the header
//! and the rule broken, never the decoded content.
//!
//! The JSON is read into small typed structs whose fields accept *any* JSON value and record what
//! they saw (see `Text`, `Kind`, `Array`, `Object` below); no `serde_json::Value` tree is built,
//! strings are borrowed from the decode buffer, and the shape rules below can then say precisely
//! what is wrong instead of relaying serde's messages (which can quote the offending value).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::marker::PhantomData;
use std::str::FromStr;
use std::thread::LocalKey;

use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::bars::errors::Refusal;
use crate::bars::warnings::{IdentityWarning, ShapeProblem};

/// `NHSD-Target-Identifier`: which service the request is for.
pub const NHSD_TARGET_IDENTIFIER: &str = "NHSD-Target-Identifier";
/// `NHSD-End-User-Organisation`: the sender's organisation (a FHIR Organization).
pub const NHSD_END_USER_ORGANISATION: &str = "NHSD-End-User-Organisation";
/// `NHSD-Requesting-Software`: the sending system (a FHIR Device).
pub const NHSD_REQUESTING_SOFTWARE: &str = "NHSD-Requesting-Software";
/// `NHSD-Requesting-Practitioner`: the user, when known (a FHIR PractitionerRole).
pub const NHSD_REQUESTING_PRACTITIONER: &str = "NHSD-Requesting-Practitioner";

/// A header's lookup key (pre-parsed: looking up by `&str` parses and lower-cases the name on
/// every request) and its name as diagnostics spell it.
struct Header {
    key: HeaderName,
    name: &'static str,
}

static TARGET: Header = Header {
    key: HeaderName::from_static("nhsd-target-identifier"),
    name: NHSD_TARGET_IDENTIFIER,
};
static ORGANISATION: Header = Header {
    key: HeaderName::from_static("nhsd-end-user-organisation"),
    name: NHSD_END_USER_ORGANISATION,
};
static SOFTWARE: Header = Header {
    key: HeaderName::from_static("nhsd-requesting-software"),
    name: NHSD_REQUESTING_SOFTWARE,
};
static PRACTITIONER: Header = Header {
    key: HeaderName::from_static("nhsd-requesting-practitioner"),
    name: NHSD_REQUESTING_PRACTITIONER,
};

/// The identifier system of an ODS organisation code (BaRS Organization identifier).
pub const ODS_ORGANIZATION_CODE_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// Longest header value decoded. The spec's examples are under 400 bytes; the bound keeps a hostile
/// header from costing more than a few microseconds.
const MAX_ENCODED_LEN: usize = 8 * 1024;
/// Decoded bytes kept on the stack: the spec's examples decode to under 300 bytes; larger values
/// (up to [`MAX_ENCODED_LEN`]) decode into a heap buffer instead.
const STACK_DECODE_CAPACITY: usize = 1024;
/// Deepest `[`/`{` nesting accepted. The deepest BaRS header (PractitionerRole `code[].coding[]`)
/// nests 5 deep; serde_json's own limit is 128, far more than any identity header needs.
const MAX_DEPTH: usize = 16;

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
        Err(Problem::Shape(shape)) if refuse_shape => Err(malformed(header.name, &shape.detail)),
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
    Problem::Refused(malformed(header, problem))
}

/// Slots of each per-thread memo of valid identity header values (direct-mapped by hash).
const MEMO_SLOTS: usize = 64;
/// Longest value memoised: the spec's examples are under 400 bytes. Bounds a thread's memos to
/// 4 × 64 × 1 KiB whatever senders send.
const MEMO_MAX_LEN: usize = 1024;

/// Valid values seen on this thread, per header, with what they decoded to. A sender repeats its
/// identity headers verbatim (one clinician's booking is several requests, the sending system's
/// `NHSD-Requesting-Software` never changes), so a hit is a hash and a byte comparison instead of
/// Base64 + JSON + shape rules (about 5 µs for the four; BENCHMARKS.md). Only values that decoded
/// cleanly are kept, with the mode they were read in, and a hit needs the very same bytes and
/// mode, so the answer is always what decoding would give.
struct Memo<T> {
    slots: Vec<Option<MemoEntry<T>>>,
}

/// A memo slot: the raw value, whether it was read in strict mode, and what it decoded to.
type MemoEntry<T> = (Box<[u8]>, bool, T);

impl<T> Memo<T> {
    fn new() -> Self {
        Memo {
            slots: std::iter::repeat_with(|| None).take(MEMO_SLOTS).collect(),
        }
    }
}

type MemoKey<T> = LocalKey<RefCell<Memo<T>>>;

thread_local! {
    static TARGET_MEMO: RefCell<Memo<TargetIdentifier>> = RefCell::new(Memo::new());
    static ORGANISATION_MEMO: RefCell<Memo<EndUserOrganisation>> = RefCell::new(Memo::new());
    static SOFTWARE_MEMO: RefCell<Memo<RequestingSoftware>> = RefCell::new(Memo::new());
    static PRACTITIONER_MEMO: RefCell<Memo<()>> = RefCell::new(Memo::new());
}

/// `decode(value, strict)`, answered from this thread's memo when the same bytes decoded cleanly
/// before in the same mode.
fn memoised<T: Clone>(
    memo: &'static MemoKey<T>,
    value: &HeaderValue,
    strict: bool,
    decode: fn(&HeaderValue, bool) -> Result<T, Problem>,
) -> Result<T, Problem> {
    let bytes = value.as_bytes();
    if bytes.len() > MEMO_MAX_LEN {
        return decode(value, strict);
    }
    let slot = (BuildHasherDefault::<DefaultHasher>::default().hash_one(bytes) % MEMO_SLOTS as u64)
        as usize;
    let hit = memo.with_borrow(|m| match &m.slots[slot] {
        Some((raw, mode, decoded)) if **raw == *bytes && *mode == strict => Some(decoded.clone()),
        _ => None,
    });
    if let Some(decoded) = hit {
        return Ok(decoded);
    }
    let decoded = decode(value, strict)?;
    memo.with_borrow_mut(|m| m.slots[slot] = Some((bytes.into(), strict, decoded.clone())));
    Ok(decoded)
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
        (Some(_), Some(_)) => Err(malformed(header.name, "sent more than once")),
        (Some(value), None) => Ok(Some(value)),
    }
}

fn decode_target(value: &HeaderValue, strict: bool) -> Result<TargetIdentifier, Problem> {
    const H: &str = NHSD_TARGET_IDENTIFIER;
    with_decoded_json(H, value, |json| {
        let doc: TargetJson<'_> = parse_object(H, json)?;
        let system = non_empty_text(doc.system.as_ref(), "system", ShapeProblem::NoSystem, false)?;
        // `system|value` is the route key and the X-BaRS-Target value: a `|` in the system would
        // make it ambiguous, and a URI cannot contain one unencoded (RFC 3986).
        if system.contains('|') {
            return Err(shape(ShapeProblem::PipeInSystem, "system must not contain '|'").into());
        }
        // The proxy routes a numeric value (`"value": 2000011147`) too.
        let value = non_empty_text(doc.value.as_ref(), "value", ShapeProblem::NoValue, !strict)?;
        Ok(TargetIdentifier {
            system: system.to_owned(),
            value: value.to_owned(),
        })
    })
}

/// The ODS system as the IG writes it, and the spellings senders use that the proxy forwards.
const ODS_SYSTEM_SPELLINGS: [&str; 4] = [
    ODS_ORGANIZATION_CODE_SYSTEM,
    "http://fhir.nhs.uk/Id/ods-organization-code",
    "https://fhir.nhs.uk/Id/ods-organisation-code",
    "http://fhir.nhs.uk/Id/ods-organisation-code",
];

fn is_ods_system(system: Option<&str>, strict: bool) -> bool {
    match system {
        Some(system) if strict => system == ODS_ORGANIZATION_CODE_SYSTEM,
        Some(system) => ODS_SYSTEM_SPELLINGS.contains(&system),
        None => false,
    }
}

fn decode_organisation(value: &HeaderValue, strict: bool) -> Result<EndUserOrganisation, Problem> {
    const H: &str = NHSD_END_USER_ORGANISATION;
    with_decoded_json(H, value, |json| {
        let doc: OrganisationJson<'_> = parse_object(H, json)?;
        if strict || doc.resource_type.is_some() {
            require_resource_type(doc.resource_type.as_ref(), "Organization")?;
        }
        let identifiers = identifier_entries(doc.identifier.as_ref(), strict)?;
        let mut ods_code: Option<&str> = None;
        for entry in identifiers {
            if !is_ods_system(entry.system.as_ref().and_then(|s| s.text(false)), strict) {
                continue;
            }
            let code = non_empty_text(
                entry.value.as_ref(),
                "ODS organisation code value",
                ShapeProblem::NoOdsCode,
                !strict,
            )?;
            // Access control and X-BaRS-Ods-Code need one answer: two different codes have none.
            match ods_code {
                Some(seen) if seen != code => {
                    return Err(shape(
                        ShapeProblem::SeveralOdsCodes,
                        "identifier has more than one ODS organisation code",
                    )
                    .into())
                }
                _ => ods_code = Some(code),
            }
        }
        let ods_code = ods_code.ok_or_else(|| {
            shape(
                ShapeProblem::NoOdsCode,
                "identifier has no ODS organisation code (system https://fhir.nhs.uk/Id/ods-organization-code)",
            )
        })?;
        // The gateway never reads the name: only strict mode checks it.
        if strict && !matches!(doc.name, None | Some(Kind::String)) {
            return Err(refused(H, "name must be a string"));
        }
        Ok(EndUserOrganisation {
            ods_code: OdsCode(ods_code.to_owned()),
        })
    })
}

fn decode_software(value: &HeaderValue, strict: bool) -> Result<RequestingSoftware, Problem> {
    const H: &str = NHSD_REQUESTING_SOFTWARE;
    with_decoded_json(H, value, |json| {
        let doc: SoftwareJson<'_> = parse_object(H, json)?;
        if strict || doc.resource_type.is_some() {
            require_resource_type(doc.resource_type.as_ref(), "Device")?;
        }
        let first = first_identifier_with_value(doc.identifier.as_ref(), strict)?;
        let value = first.value_text(!strict);
        let id = match first.system.as_ref().and_then(|s| s.text(false)) {
            Some(system) if !system.trim().is_empty() => {
                check_no_control(system, "identifier system")?;
                format!("{system}|{value}")
            }
            _ => value.to_owned(),
        };
        // The spec's example writes deviceName and version as objects, FHIR R4 as arrays: accept
        // both (BARS-CONTEXT.md), and their absence, but not a bare string or number. The gateway
        // never reads them: only strict mode checks them.
        if strict && !matches!(doc.device_name, None | Some(Kind::Object | Kind::Array)) {
            return Err(refused(H, "deviceName must be an object or an array"));
        }
        if strict && !matches!(doc.version, None | Some(Kind::Object | Kind::Array)) {
            return Err(refused(H, "version must be an object or an array"));
        }
        Ok(RequestingSoftware { id: Some(id) })
    })
}

fn decode_practitioner(value: &HeaderValue, strict: bool) -> Result<(), Problem> {
    const H: &str = NHSD_REQUESTING_PRACTITIONER;
    with_decoded_json(H, value, |json| {
        let doc: PractitionerJson<'_> = parse_object(H, json)?;
        // Optional header and optional field: only a wrong resourceType is refused.
        if doc.resource_type.is_some() {
            require_resource_type(doc.resource_type.as_ref(), "PractitionerRole")?;
        }
        // The IG expects an sds-role-profile-id identifier; any identifier with a value is accepted
        // because the gateway never acts on this header.
        first_identifier_with_value(doc.identifier.as_ref(), strict)?;
        if strict && !matches!(doc.code, None | Some(Kind::Array)) {
            return Err(refused(H, "code must be an array"));
        }
        Ok(())
    })
}

/// Runs the shared steps (length, Base64, UTF-8, nesting) and hands the JSON text to `read`.
fn with_decoded_json<T>(
    header: &'static str,
    value: &HeaderValue,
    read: impl FnOnce(&str) -> Result<T, Problem>,
) -> Result<T, Problem> {
    let raw = value.as_bytes();
    if raw.len() > MAX_ENCODED_LEN {
        return Err(refused(header, "is too long"));
    }
    // Proxies and hand-written clients leave spaces around the value; they are never Base64.
    let encoded = raw.trim_ascii();
    if encoded.is_empty() {
        return Err(refused(header, "is empty"));
    }
    // This runs on every request: typical values decode on the stack, without an allocation.
    let needed = base64::decoded_len_estimate(encoded.len());
    let mut stack = [0u8; STACK_DECODE_CAPACITY];
    let mut heap = Vec::new();
    let buffer: &mut [u8] = if needed <= STACK_DECODE_CAPACITY {
        &mut stack[..needed]
    } else {
        heap.resize(needed, 0);
        &mut heap
    };
    // Standard alphabet only: URL-safe `-`/`_` and anything else fail here (BARS-CONTEXT.md:
    // "accept standard Base64 with or without padding ... reject everything else").
    let len = STANDARD_PAD_INDIFFERENT
        .decode_slice(encoded, buffer)
        .map_err(|_| refused(header, "is not valid Base64"))?;
    let decoded = &buffer[..len];
    let json = std::str::from_utf8(decoded).map_err(|_| refused(header, "is not UTF-8"))?;
    check_nesting(json.as_bytes()).map_err(|()| refused(header, "is nested too deeply"))?;
    read(json)
}

/// Refuses JSON nested deeper than [`MAX_DEPTH`] in one pass over the bytes, before serde recurses.
fn check_nesting(json: &[u8]) -> Result<(), ()> {
    // Fast path (vectorised count): with no more opening brackets than the limit, in strings or
    // not, the nesting cannot exceed it. Real headers have under ten.
    if json.iter().filter(|&&b| b == b'[' || b == b'{').count() <= MAX_DEPTH {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses the text as a JSON object of shape `T`. Surrounding whitespace (the spec's examples end
/// in a newline) is JSON whitespace and accepted by serde_json.
fn parse_object<'a, T: Deserialize<'a>>(header: &'static str, json: &'a str) -> Result<T, Problem> {
    match serde_json::from_str::<Object<T>>(json) {
        Ok(Object::Fields(fields)) => Ok(fields),
        Ok(Object::Other) => Err(shape(ShapeProblem::NotAnObject, "is not a JSON object").into()),
        // Every field type below accepts any JSON value, so the only data error left is a repeated
        // key, which serde's derive refuses: good, since a second copy could hide from a check
        // (in lenient mode nothing is read from such a header).
        Err(e) if e.is_data() => {
            Err(shape(ShapeProblem::DuplicateField, "has a duplicate JSON field").into())
        }
        // serde_json's own message is not used: it can quote the content.
        Err(_) => Err(refused(header, "is not valid JSON")),
    }
}

fn require_resource_type(
    resource_type: Option<&Text<'_>>,
    expected: &'static str,
) -> Result<(), Shape> {
    if resource_type.and_then(|t| t.text(false)) == Some(expected) {
        Ok(())
    } else {
        Err(shape(
            ShapeProblem::WrongResourceType,
            format!("resourceType must be \"{expected}\""),
        ))
    }
}

/// The `identifier` entries (an array; in lenient mode also a single object), each checked to be
/// an object whose `system`, when present, is a string and whose `value`, when present, is a
/// string (in lenient mode also an integer).
fn identifier_entries<'d, 'a>(
    identifier: Option<&'d Array<Object<IdentifierJson<'a>>>>,
    strict: bool,
) -> Result<impl Iterator<Item = &'d IdentifierJson<'a>>, Shape> {
    let items = match identifier {
        Some(Array::Items(items)) => items.as_slice(),
        Some(Array::Single(item)) if !strict => std::slice::from_ref(item),
        _ => {
            return Err(shape(
                ShapeProblem::BadIdentifier,
                "identifier must be an array",
            ))
        }
    };
    for item in items {
        let Object::Fields(entry) = item else {
            return Err(shape(
                ShapeProblem::BadIdentifier,
                "identifier entries must be objects",
            ));
        };
        if entry
            .system
            .as_ref()
            .is_some_and(|s| s.text(false).is_none())
        {
            return Err(shape(
                ShapeProblem::BadIdentifier,
                "identifier system must be a string",
            ));
        }
        if entry
            .value
            .as_ref()
            .is_some_and(|v| v.text(!strict).is_none())
        {
            return Err(shape(
                ShapeProblem::BadIdentifier,
                "identifier value must be a string",
            ));
        }
    }
    Ok(items.iter().filter_map(|item| match item {
        Object::Fields(entry) => Some(entry),
        Object::Other => None,
    }))
}

/// The first identifier entry with a non-blank value (FHIR Device/PractitionerRole identifiers).
fn first_identifier_with_value<'d, 'a>(
    identifier: Option<&'d Array<Object<IdentifierJson<'a>>>>,
    strict: bool,
) -> Result<&'d IdentifierJson<'a>, Shape> {
    let first = identifier_entries(identifier, strict)?
        .find(|entry| !entry.value_text(!strict).trim().is_empty())
        .ok_or_else(|| {
            shape(
                ShapeProblem::NoIdentifierValue,
                "identifier must contain an entry with a non-empty value",
            )
        })?;
    check_no_control(first.value_text(!strict), "identifier value")?;
    Ok(first)
}

/// The field's text if it is a string (or, with `numbers`, an integer) with a non-blank value and
/// no control characters; else `problem`.
fn non_empty_text<'t>(
    field: Option<&'t Text<'_>>,
    name: &str,
    problem: ShapeProblem,
    numbers: bool,
) -> Result<&'t str, Shape> {
    match field.and_then(|t| t.text(numbers)) {
        Some(text) if !text.trim().is_empty() => {
            check_no_control(text, name)?;
            Ok(text)
        }
        _ => Err(shape(problem, format!("{name} must be a non-empty string"))),
    }
}

/// Extracted values become forwarded headers (`X-BaRS-Target`, `X-BaRS-Ods-Code`) and log fields:
/// a JSON-escaped CR, LF or NUL must not reach either.
fn check_no_control(text: &str, name: &str) -> Result<(), Shape> {
    let has_control = if text.is_ascii() {
        text.bytes().any(|b| b.is_ascii_control())
    } else {
        text.chars().any(char::is_control)
    };
    if has_control {
        Err(shape(
            ShapeProblem::ControlCharacters,
            format!("{name} contains control characters"),
        ))
    } else {
        Ok(())
    }
}

fn malformed(header: &'static str, problem: &str) -> Refusal {
    Refusal::MalformedHeader {
        header,
        problem: problem.to_owned(),
    }
}

// ---- JSON shapes ------------------------------------------------------------------------------
// Unknown fields are ignored: FHIR resources carry more than the gateway reads.

#[derive(serde::Deserialize)]
struct TargetJson<'a> {
    #[serde(borrow)]
    system: Option<Text<'a>>,
    #[serde(borrow)]
    value: Option<Text<'a>>,
}

#[derive(serde::Deserialize)]
struct OrganisationJson<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    identifier: Option<Array<Object<IdentifierJson<'a>>>>,
    name: Option<Kind>,
}

#[derive(serde::Deserialize)]
struct SoftwareJson<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    identifier: Option<Array<Object<IdentifierJson<'a>>>>,
    #[serde(rename = "deviceName")]
    device_name: Option<Kind>,
    version: Option<Kind>,
}

#[derive(serde::Deserialize)]
struct PractitionerJson<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    identifier: Option<Array<Object<IdentifierJson<'a>>>>,
    code: Option<Kind>,
}

/// A FHIR Identifier: `{system?, value?}`.
#[derive(serde::Deserialize)]
struct IdentifierJson<'a> {
    #[serde(borrow)]
    system: Option<Text<'a>>,
    #[serde(borrow)]
    value: Option<Text<'a>>,
}

impl IdentifierJson<'_> {
    /// The value (a string, or with `numbers` also an integer), or "" (entries are checked to
    /// hold such a value before this is used).
    fn value_text(&self, numbers: bool) -> &str {
        self.value
            .as_ref()
            .and_then(|v| v.text(numbers))
            .unwrap_or("")
    }
}

/// Any JSON value, kept when it is a string (borrowed unless it contained escapes) or an integer
/// (as its decimal text: the proxy routes `"value": 2000011147`).
enum Text<'a> {
    String(Cow<'a, str>),
    Integer(String),
    Other,
}

impl Text<'_> {
    /// The string, or with `numbers` also an integer's text.
    fn text(&self, numbers: bool) -> Option<&str> {
        match self {
            Text::String(text) => Some(text),
            Text::Integer(text) if numbers => Some(text),
            Text::Integer(_) | Text::Other => None,
        }
    }
}

/// Any JSON value, reduced to its kind (contents skipped without allocating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Object,
    Array,
    Other,
}

/// Any JSON value, read as `T` items when it is an array, as one `T` when it is an object.
enum Array<T> {
    Items(Vec<T>),
    Single(T),
    Other,
}

/// Any JSON value, read as the struct `T` when it is an object.
enum Object<T> {
    Fields(T),
    Other,
}

/// Visitor methods for the JSON scalars, all giving `$value`.
macro_rules! scalars_give {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

struct TextVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Text::Integer(n.to_string()))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Text::Integer(n.to_string()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Owned(text)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Text::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| Text::Other)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor(PhantomData))
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_give!(Kind::Other);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Kind::String)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Kind::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| Kind::Object)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KindVisitor)
    }
}

struct ArrayVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ArrayVisitor<T> {
    type Value = Array<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_give!(Array::Other);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Array::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Identifier arrays hold one or two entries in practice.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(2).min(8));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Array::Items(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        // FHIR says array; senders write a single identifier as an object (lenient mode reads it).
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Array::Single)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ArrayVisitor(PhantomData))
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_give!(Object::Other);

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Object::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Object::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object::Fields)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};

    const FIXTURE: &str = include_str!("../../tests/fixtures/bars-examples/headers-examples.json");

    const ALL: IdentityRequirements = IdentityRequirements {
        target: true,
        organisation: true,
        software: true,
    };
    const NONE: IdentityRequirements = IdentityRequirements {
        target: false,
        organisation: false,
        software: false,
    };

    const HEADERS: [&str; 4] = [
        NHSD_TARGET_IDENTIFIER,
        NHSD_END_USER_ORGANISATION,
        NHSD_REQUESTING_SOFTWARE,
        NHSD_REQUESTING_PRACTITIONER,
    ];

    fn fixture() -> serde_json::Value {
        serde_json::from_str(FIXTURE).unwrap()
    }

    /// The valid request's four NHSD headers, as sent.
    fn valid_headers() -> HeaderMap {
        let fixture = fixture();
        let sent = &fixture["valid_process_message_request"]["headers"];
        let mut map = HeaderMap::new();
        for name in HEADERS {
            let value = sent[name].as_str().unwrap();
            map.insert(name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn with(header: &'static str, value: &[u8]) -> HeaderMap {
        let mut map = valid_headers();
        map.insert(header, HeaderValue::from_bytes(value).unwrap());
        map
    }

    fn encoded(json: &str) -> String {
        STANDARD.encode(json)
    }

    #[test]
    fn memoised_decoding_answers_exactly_as_decoding_does() {
        // Alternating values with the same memo slot count: every answer must be the value's own.
        let targets: Vec<String> = (0..(3 * MEMO_SLOTS))
            .map(|n| {
                encoded(&format!(
                    r#"{{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"{n}"}}"#
                ))
            })
            .collect();
        for round in 0..3 {
            for (n, value) in targets.iter().enumerate() {
                let decoded =
                    decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL)
                        .unwrap_or_else(|e| panic!("round {round}, {n}: {e}"));
                assert_eq!(
                    decoded.target.unwrap().value,
                    n.to_string(),
                    "round {round}"
                );
            }
        }
        let first = decode_identity_headers(&valid_headers(), ALL).unwrap();
        let again = decode_identity_headers(&valid_headers(), ALL).unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn a_refused_value_is_refused_every_time_even_next_to_a_memoised_one() {
        let good = encoded(r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"1"}"#);
        let bad = encoded(r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":""}"#);
        for _ in 0..3 {
            decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, good.as_bytes()), ALL).unwrap();
            assert_malformed(
                decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, bad.as_bytes()), ALL),
                NHSD_TARGET_IDENTIFIER,
                "value",
            );
        }
        // One byte changed after the valid value was memoised: decoded afresh, and refused.
        let mut tampered = good.into_bytes();
        tampered[3] = b'*';
        assert_malformed(
            decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, &tampered), ALL),
            NHSD_TARGET_IDENTIFIER,
            "Base64",
        );
    }

    #[test]
    fn values_over_the_memo_bound_are_still_decoded() {
        let long = "x".repeat(MEMO_MAX_LEN);
        let value = encoded(&format!(
            r#"{{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"{long}"}}"#
        ));
        assert!(value.len() > MEMO_MAX_LEN);
        for _ in 0..2 {
            let decoded =
                decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL)
                    .unwrap();
            assert_eq!(decoded.target.unwrap().value, long);
        }
    }

    fn with_json(header: &'static str, json: &str) -> HeaderMap {
        with(header, encoded(json).as_bytes())
    }

    /// Asserts a 400 / value refusal naming `header` whose problem contains `problem`.
    fn assert_malformed(result: Result<IdentityHeaders, Refusal>, header: &str, problem: &str) {
        let refusal = result.expect_err("should be refused");
        match &refusal {
            Refusal::MalformedHeader {
                header: h,
                problem: p,
            } => {
                assert_eq!(*h, header, "{refusal}");
                assert!(p.contains(problem), "expected {problem:?} in {refusal}");
            }
            other => panic!("expected MalformedHeader, got {other:?}"),
        }
        assert_eq!(refusal.status(), 400);
        assert_eq!(refusal.bars_code(), "REC_BAD_REQUEST");
        assert_eq!(refusal.issue_code(), "value");
        assert!(refusal.to_string().starts_with(header), "{refusal}");
    }

    const ORG_OK: &str = r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}],"name":"X"}"#;
    const SOFTWARE_OK: &str = r#"{"resourceType":"Device","identifier":[{"system":"https://s.example/Id/device","value":"APP-1"}]}"#;

    #[test]
    fn every_valid_header_from_the_spec_example_passes() {
        let decoded = decode_identity_headers(&valid_headers(), ALL).unwrap();
        assert_eq!(
            decoded.target,
            Some(TargetIdentifier {
                system: "https://fhir.nhs.uk/Id/dos-service-id".into(),
                value: "2000011147".into(),
            })
        );
        assert_eq!(
            decoded.organisation,
            Some(EndUserOrganisation {
                ods_code: OdsCode("A1001".into())
            })
        );
        assert_eq!(
            decoded.software,
            Some(RequestingSoftware {
                id: Some("https://consumersupplier.com/Id/device-identifier|SUPP-APP-1".into())
            })
        );
        assert!(decoded.practitioner_present);
    }

    #[test]
    fn spec_example_encodings_end_in_a_newline_inside_the_base64() {
        // Guards the premise of the tolerance: if the fixture changed, the test above would not
        // cover a trailing newline any more.
        let fixture = fixture();
        let sent = &fixture["valid_process_message_request"]["headers"];
        let org = STANDARD
            .decode(sent[NHSD_END_USER_ORGANISATION].as_str().unwrap())
            .unwrap();
        assert_eq!(org.last(), Some(&b'\n'));
    }

    #[test]
    fn decoded_fixture_json_re_encoded_passes_for_every_header() {
        let fixture = fixture();
        let mut map = HeaderMap::new();
        for name in HEADERS {
            let json = fixture["decoded"][name]["json"].to_string();
            map.insert(name, HeaderValue::from_str(&encoded(&json)).unwrap());
        }
        let decoded = decode_identity_headers(&map, ALL).unwrap();
        assert_eq!(decoded.organisation.unwrap().ods_code.as_str(), "A1001");
    }

    #[test]
    fn target_identifier_with_spaces_and_no_padding_passes() {
        let fixture = fixture();
        let observed =
            &fixture["other_observed_values"]["NHSD-Target-Identifier_v1.0.0_schema_example"];
        let value = observed["encoded"].as_str().unwrap();
        assert!(!value.ends_with('='));
        let decoded =
            decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL).unwrap();
        let target = decoded.target.unwrap();
        assert_eq!(target.to_string(), "tests|NHS0001");
    }

    #[test]
    fn unpadded_encoding_passes() {
        // 28 and 29 bytes of JSON: two and one padding characters left off.
        for value in ["v12", "v123"] {
            let json = format!(r#"{{"system":"s","value":"{value}"}}"#);
            assert!(STANDARD.encode(&json).ends_with('='));
            let map = with(
                NHSD_TARGET_IDENTIFIER,
                STANDARD_NO_PAD.encode(&json).as_bytes(),
            );
            let decoded = decode_identity_headers(&map, ALL).unwrap();
            assert_eq!(decoded.target.unwrap().value, value);
        }
    }

    #[test]
    fn whitespace_around_the_header_value_and_inside_the_json_passes() {
        let json = "\n\t {\"system\" : \"s\" , \"value\" : \"v\"} \r\n \n";
        let value = format!("  {}\t", encoded(json));
        let map = with(NHSD_TARGET_IDENTIFIER, value.as_bytes());
        assert_eq!(
            decode_identity_headers(&map, ALL)
                .unwrap()
                .target
                .unwrap()
                .to_string(),
            "s|v"
        );
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let json = r#"{"system":"https:\/\/fhir.nhs.uk\/Id\/dos-service-id","value":"\u0032000"}"#;
        let target = decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, json), ALL)
            .unwrap()
            .target
            .unwrap();
        assert_eq!(target.system, "https://fhir.nhs.uk/Id/dos-service-id");
        assert_eq!(target.value, "2000");
    }

    #[test]
    fn repo_test_target_identifier_not_base64_is_refused() {
        let fixture = fixture();
        let case = &fixture["invalid_cases_from_repo_tests"]["target_identifier_not_base64"];
        let value = case[NHSD_TARGET_IDENTIFIER].as_str().unwrap();
        let result = decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL);
        assert_malformed(
            result.clone(),
            NHSD_TARGET_IDENTIFIER,
            "is not valid Base64",
        );
        assert_eq!(
            result.unwrap_err().to_string(),
            "NHSD-Target-Identifier header is malformed: is not valid Base64"
        );
    }

    #[test]
    fn repo_test_target_identifier_missing_value_is_refused() {
        let fixture = fixture();
        let case = &fixture["invalid_cases_from_repo_tests"]["target_identifier_missing_value"];
        let json = case["NHSD-Target-Identifier_json"].to_string();
        let result = decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL);
        assert_eq!(
            result.unwrap_err().to_string(),
            "NHSD-Target-Identifier header is malformed: value must be a non-empty string"
        );
    }

    #[test]
    fn repo_test_unknown_target_value_is_well_formed_and_left_to_routing() {
        // The proxy answers 404 for an unknown target: that is `Refusal::UnknownTarget`, raised
        // where upstreams are chosen, not a header-shape problem.
        let fixture = fixture();
        let case = &fixture["invalid_cases_from_repo_tests"]["target_identifier_unknown_value"];
        let json = case["NHSD-Target-Identifier_json"].to_string();
        let decoded =
            decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL).unwrap();
        assert_eq!(decoded.target.unwrap().value, "invalid");
    }

    #[test]
    fn bad_header_values_are_refused_with_a_precise_problem() {
        let deep = format!(
            r#"{{"system":"s","value":"v","x":{}1{}}}"#,
            "[".repeat(16),
            "]".repeat(16)
        );
        let table: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bad base64", b"@@@@".to_vec(), "is not valid Base64"),
            ("bad base64 length", b"eyJ".to_vec(), "is not valid Base64"),
            (
                "base64 with inner space",
                b"eyJz eXN0".to_vec(),
                "is not valid Base64",
            ),
            (
                "base64 with text after padding",
                b"eyI=eyI=".to_vec(),
                "is not valid Base64",
            ),
            (
                "url-safe alphabet",
                URL_SAFE
                    .encode(r#"{"system":"s?>","value":"v~~?"}"#)
                    .into_bytes(),
                "is not valid Base64",
            ),
            ("empty", b"".to_vec(), "is empty"),
            ("blank", b"   ".to_vec(), "is empty"),
            (
                "not json",
                encoded("system=s&value=v").into_bytes(),
                "is not valid JSON",
            ),
            (
                "truncated json",
                encoded(r#"{"system":"s","#).into_bytes(),
                "is not valid JSON",
            ),
            (
                "trailing garbage",
                encoded(r#"{"system":"s","value":"v"} x"#).into_bytes(),
                "is not valid JSON",
            ),
            (
                "json array",
                encoded(r#"[{"system":"s","value":"v"}]"#).into_bytes(),
                "is not a JSON object",
            ),
            (
                "json string",
                encoded(r#""s|v""#).into_bytes(),
                "is not a JSON object",
            ),
            (
                "json null",
                encoded("null").into_bytes(),
                "is not a JSON object",
            ),
            (
                "missing value",
                encoded(r#"{"system":"s"}"#).into_bytes(),
                "value must be a non-empty string",
            ),
            (
                "empty value",
                encoded(r#"{"system":"s","value":""}"#).into_bytes(),
                "value must be a non-empty string",
            ),
            (
                "blank value",
                encoded(r#"{"system":"s","value":"  "}"#).into_bytes(),
                "value must be a non-empty string",
            ),
            (
                "numeric value",
                encoded(r#"{"system":"s","value":2000011147}"#).into_bytes(),
                "value must be a non-empty string",
            ),
            (
                "null value",
                encoded(r#"{"system":"s","value":null}"#).into_bytes(),
                "value must be a non-empty string",
            ),
            (
                "missing system",
                encoded(r#"{"value":"v"}"#).into_bytes(),
                "system must be a non-empty string",
            ),
            (
                "object system",
                encoded(r#"{"system":{},"value":"v"}"#).into_bytes(),
                "system must be a non-empty string",
            ),
            (
                "pipe in system",
                encoded(r#"{"system":"a|b","value":"v"}"#).into_bytes(),
                "system must not contain '|'",
            ),
            (
                "newline in value",
                encoded(r#"{"system":"s","value":"v\r\nX-Evil: 1"}"#).into_bytes(),
                "value contains control characters",
            ),
            (
                "duplicate key",
                encoded(r#"{"system":"s","value":"v","value":"w"}"#).into_bytes(),
                "has a duplicate JSON field",
            ),
            (
                "deeply nested",
                encoded(&deep).into_bytes(),
                "is nested too deeply",
            ),
            (
                "non-utf-8",
                STANDARD
                    .encode(b"{\"system\":\"s\xff\",\"value\":\"v\"}")
                    .into_bytes(),
                "is not UTF-8",
            ),
            (
                "huge",
                encoded(&format!(
                    r#"{{"system":"s","value":"{}"}}"#,
                    "9".repeat(7000)
                ))
                .into_bytes(),
                "is too long",
            ),
        ];
        for (case, value, problem) in table {
            let result = decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, &value), ALL);
            assert!(result.is_err(), "{case} should be refused");
            assert_malformed(result, NHSD_TARGET_IDENTIFIER, problem);
        }
    }

    #[test]
    fn nesting_up_to_the_limit_passes() {
        let json = format!(
            r#"{{"system":"s","value":"v","x":{}1{}}}"#,
            "[".repeat(15),
            "]".repeat(15)
        );
        assert!(decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL).is_ok());
        // Brackets inside strings do not count.
        let json = format!(
            r#"{{"system":"s","value":"v","x":"\"{}"}}"#,
            "[{".repeat(100)
        );
        assert!(decode_identity_headers(&with_json(NHSD_TARGET_IDENTIFIER, &json), ALL).is_ok());
    }

    #[test]
    fn header_of_exactly_the_limit_is_decoded() {
        let mut json = format!(
            r#"{{"system":"s","value":"v","pad":"{}"}}"#,
            "x".repeat(6000)
        );
        while STANDARD.encode(&json).len() < MAX_ENCODED_LEN {
            json.push(' ');
        }
        let value = STANDARD.encode(&json);
        assert_eq!(value.len(), MAX_ENCODED_LEN);
        assert!(
            decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL).is_ok()
        );
        let value = format!("{value} ");
        let result = decode_identity_headers(&with(NHSD_TARGET_IDENTIFIER, value.as_bytes()), ALL);
        assert_malformed(result, NHSD_TARGET_IDENTIFIER, "is too long");
    }

    #[test]
    fn every_header_sent_twice_is_refused() {
        for name in HEADERS {
            let mut map = valid_headers();
            let value = map[name].clone();
            map.append(name, value);
            assert_malformed(
                decode_identity_headers(&map, ALL),
                name,
                "sent more than once",
            );
        }
    }

    #[test]
    fn every_header_is_validated_when_present_even_if_not_required() {
        for name in HEADERS {
            let result = decode_identity_headers(&with(name, b"not base64!"), NONE);
            assert_malformed(result, name, "is not valid Base64");
            let result = decode_identity_headers(&with_json(name, "[]"), NONE);
            assert_malformed(result, name, "is not a JSON object");
        }
    }

    #[test]
    fn required_headers_that_are_missing_are_refused_in_order() {
        let cases = [
            (NHSD_TARGET_IDENTIFIER, ALL),
            (
                NHSD_END_USER_ORGANISATION,
                IdentityRequirements {
                    target: false,
                    ..ALL
                },
            ),
            (
                NHSD_REQUESTING_SOFTWARE,
                IdentityRequirements {
                    software: true,
                    ..NONE
                },
            ),
        ];
        for (header, required) in cases {
            let refusal = decode_identity_headers(&HeaderMap::new(), required).unwrap_err();
            assert_eq!(refusal, Refusal::MissingHeader { header });
            assert_eq!(refusal.status(), 400);
            assert_eq!(refusal.issue_code(), "invalid");
            assert!(refusal.to_string().starts_with(header));
        }
    }

    #[test]
    fn headers_not_required_may_be_absent() {
        let decoded = decode_identity_headers(&HeaderMap::new(), NONE).unwrap();
        assert_eq!(decoded, IdentityHeaders::default());
        let mut map = valid_headers();
        map.remove(NHSD_REQUESTING_PRACTITIONER);
        map.remove(NHSD_END_USER_ORGANISATION);
        map.remove(NHSD_REQUESTING_SOFTWARE);
        let decoded = decode_identity_headers(
            &map,
            IdentityRequirements {
                target: true,
                ..NONE
            },
        )
        .unwrap();
        assert!(decoded.target.is_some());
        assert!(!decoded.practitioner_present);
    }

    #[test]
    fn organisation_shape_rules_are_enforced() {
        let ods = ODS_ORGANIZATION_CODE_SYSTEM;
        let table: Vec<(String, &str)> = vec![
            (r#"{"identifier":[]}"#.into(), r#"resourceType must be "Organization""#),
            (
                format!(r#"{{"resourceType":"Organisation","identifier":[{{"system":"{ods}","value":"A1"}}]}}"#),
                r#"resourceType must be "Organization""#,
            ),
            (
                format!(r#"{{"resourceType":["Organization"],"identifier":[{{"system":"{ods}","value":"A1"}}]}}"#),
                r#"resourceType must be "Organization""#,
            ),
            (r#"{"resourceType":"Organization"}"#.into(), "identifier must be an array"),
            (
                format!(r#"{{"resourceType":"Organization","identifier":{{"system":"{ods}","value":"A1"}}}}"#),
                "identifier must be an array",
            ),
            (r#"{"resourceType":"Organization","identifier":["A1"]}"#.into(), "identifier entries must be objects"),
            (
                r#"{"resourceType":"Organization","identifier":[{"system":"https://other/Id","value":"A1"}]}"#.into(),
                "identifier has no ODS organisation code",
            ),
            (r#"{"resourceType":"Organization","identifier":[]}"#.into(), "identifier has no ODS organisation code"),
            (
                format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}"}}]}}"#),
                "ODS organisation code value must be a non-empty string",
            ),
            (
                format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":""}}]}}"#),
                "ODS organisation code value must be a non-empty string",
            ),
            (
                format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":7}}]}}"#),
                "identifier value must be a string",
            ),
            (
                format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":"A1"}},{{"system":"{ods}","value":"B2"}}]}}"#),
                "more than one ODS organisation code",
            ),
            (
                format!(r#"{{"resourceType":"Organization","identifier":[{{"system":"{ods}","value":"A1"}}],"name":{{"text":"x"}}}}"#),
                "name must be a string",
            ),
        ];
        for (json, problem) in table {
            let result =
                decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, &json), ALL);
            assert_malformed(result, NHSD_END_USER_ORGANISATION, problem);
        }
    }

    #[test]
    fn organisation_without_ods_code_is_refused() {
        let json = r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/other","value":"A1001"}],"name":"X"}"#;
        let result = decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, json), ALL);
        assert_malformed(
            result,
            NHSD_END_USER_ORGANISATION,
            "no ODS organisation code",
        );
    }

    #[test]
    fn organisation_finds_the_ods_code_among_other_identifiers_and_fields() {
        let ods = ODS_ORGANIZATION_CODE_SYSTEM;
        let json = format!(
            r#"{{"resourceType":"Organization","id":"x","meta":{{"profile":["p"]}},"identifier":[{{"system":"https://other","value":"Z9"}},{{"use":"official","system":"{ods}","value":"RX1"}},{{"system":"{ods}","value":"RX1"}}],"active":true}}"#
        );
        let decoded =
            decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, &json), ALL).unwrap();
        assert_eq!(decoded.organisation.unwrap().ods_code.to_string(), "RX1");
        // name is optional.
        let decoded =
            decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, ORG_OK), ALL).unwrap();
        assert!(decoded.organisation.is_some());
    }

    #[test]
    fn software_device_name_and_version_as_object_array_or_absent_are_accepted() {
        let base =
            r#""resourceType":"Device","identifier":[{"system":"https://s/Id","value":"APP"}]"#;
        let variants = [
            "",
            r#","deviceName":{"name":"N","type":"manufacturer-name"},"version":{"value":"1.0.0"}"#,
            r#","deviceName":[{"name":"N","type":"manufacturer-name"}],"version":[{"value":"1.0.0"}]"#,
            r#","deviceName":[{"name":"N"}],"version":{"value":"1"}"#,
            r#","deviceName":null"#,
        ];
        for extra in variants {
            let json = format!("{{{base}{extra}}}");
            let decoded = decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, &json), ALL)
                .unwrap_or_else(|e| panic!("{extra}: {e}"));
            assert_eq!(
                decoded.software.unwrap().id.as_deref(),
                Some("https://s/Id|APP")
            );
        }
    }

    #[test]
    fn software_shape_rules_are_enforced() {
        let table = [
            (
                r#"{"identifier":[{"value":"A"}]}"#,
                r#"resourceType must be "Device""#,
            ),
            (
                r#"{"resourceType":"Organization","identifier":[{"value":"A"}]}"#,
                r#"resourceType must be "Device""#,
            ),
            (
                r#"{"resourceType":"Device"}"#,
                "identifier must be an array",
            ),
            (
                r#"{"resourceType":"Device","identifier":[]}"#,
                "identifier must contain an entry with a non-empty value",
            ),
            (
                r#"{"resourceType":"Device","identifier":[{"system":"s"}]}"#,
                "identifier must contain an entry with a non-empty value",
            ),
            (
                r#"{"resourceType":"Device","identifier":[{"system":"s","value":""}]}"#,
                "identifier must contain an entry with a non-empty value",
            ),
            (
                r#"{"resourceType":"Device","identifier":[{"system":1,"value":"A"}]}"#,
                "identifier system must be a string",
            ),
            (
                r#"{"resourceType":"Device","identifier":[{"value":"A"}],"deviceName":"N"}"#,
                "deviceName must be an object or an array",
            ),
            (
                r#"{"resourceType":"Device","identifier":[{"value":"A"}],"version":"1.0.0"}"#,
                "version must be an object or an array",
            ),
        ];
        for (json, problem) in table {
            let result = decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, json), ALL);
            assert_malformed(result, NHSD_REQUESTING_SOFTWARE, problem);
        }
    }

    #[test]
    fn software_id_is_the_first_identifier_with_a_value() {
        let json = r#"{"resourceType":"Device","identifier":[{"system":"s0","value":""},{"value":"APP-2"},{"system":"s3","value":"APP-3"}]}"#;
        let decoded =
            decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, json), ALL).unwrap();
        assert_eq!(decoded.software.unwrap().id.as_deref(), Some("APP-2"));
        let decoded =
            decode_identity_headers(&with_json(NHSD_REQUESTING_SOFTWARE, SOFTWARE_OK), ALL)
                .unwrap();
        assert_eq!(
            decoded.software.unwrap().id.as_deref(),
            Some("https://s.example/Id/device|APP-1")
        );
    }

    #[test]
    fn practitioner_shape_rules_are_enforced() {
        let table = [
            (
                r#"{"resourceType":"Practitioner","identifier":[{"value":"1"}]}"#,
                r#"resourceType must be "PractitionerRole""#,
            ),
            (
                r#"{"resourceType":"PractitionerRole"}"#,
                "identifier must be an array",
            ),
            (
                r#"{"resourceType":"PractitionerRole","identifier":[{"system":"s"}]}"#,
                "identifier must contain an entry with a non-empty value",
            ),
            (
                r#"{"resourceType":"PractitionerRole","identifier":[{"value":"1"}],"code":{"coding":[]}}"#,
                "code must be an array",
            ),
        ];
        for (json, problem) in table {
            let result =
                decode_identity_headers(&with_json(NHSD_REQUESTING_PRACTITIONER, json), ALL);
            assert_malformed(result, NHSD_REQUESTING_PRACTITIONER, problem);
        }
    }

    #[test]
    fn practitioner_with_any_identifier_and_no_resource_type_is_accepted() {
        let json = r#"{"identifier":[{"system":"https://other/Id","value":"555"}]}"#;
        let decoded =
            decode_identity_headers(&with_json(NHSD_REQUESTING_PRACTITIONER, json), ALL).unwrap();
        assert!(decoded.practitioner_present);
    }

    #[test]
    fn spec_placeholder_practitioner_example_is_refused_for_its_resource_type() {
        let fixture = fixture();
        let value = fixture["decoded"][NHSD_REQUESTING_PRACTITIONER]["spec_schema_example_encoded"]
            .as_str()
            .unwrap();
        let result =
            decode_identity_headers(&with(NHSD_REQUESTING_PRACTITIONER, value.as_bytes()), ALL);
        assert_malformed(result, NHSD_REQUESTING_PRACTITIONER, "resourceType must be");
    }

    #[test]
    fn diagnostics_never_echo_decoded_content() {
        let secret = "9434765919-PATIENT";
        let jsons = [
            format!(r#"{{"resourceType":"{secret}","identifier":[]}}"#),
            format!(
                r#"{{"resourceType":"Organization","identifier":[{{"system":"{secret}","value":"{secret}"}}]}}"#
            ),
            format!(
                r#"{{"resourceType":"Organization","identifier":[{{"system":"{ODS_ORGANIZATION_CODE_SYSTEM}","value":7}}],"{secret}":1}}"#
            ),
            format!(r#"{{"resourceType":"Organization","{secret}":"#),
            format!(r#"{{"resourceType":"Organization","name":{{"x":"{secret}"}}}}"#),
            format!(r#"{{"resourceType":"Organization","resourceType":"{secret}"}}"#),
        ];
        for json in jsons {
            let refusal =
                decode_identity_headers(&with_json(NHSD_END_USER_ORGANISATION, &json), ALL)
                    .unwrap_err();
            assert!(!refusal.to_string().contains(secret), "{refusal}");
        }
    }

    #[test]
    fn target_identifier_parses_and_displays_route_keys() {
        let target: TargetIdentifier = "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
            .parse()
            .unwrap();
        assert_eq!(target.system, "https://fhir.nhs.uk/Id/dos-service-id");
        assert_eq!(target.value, "2000011147");
        assert_eq!(
            target.to_string(),
            "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
        );
        let target: TargetIdentifier = "s|a|b".parse().unwrap();
        assert_eq!(
            (target.system.as_str(), target.value.as_str()),
            ("s", "a|b")
        );
        for bad in ["", "|", "s|", "|v", "sv", " |v", "s|\n"] {
            assert_eq!(
                bad.parse::<TargetIdentifier>(),
                Err(InvalidTargetIdentifier),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn decoded_target_matches_the_parsed_route_key() {
        let decoded = decode_identity_headers(&valid_headers(), ALL).unwrap();
        let key: TargetIdentifier = "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
            .parse()
            .unwrap();
        assert_eq!(decoded.target, Some(key));
    }

    const LENIENT: IdentityPolicy = IdentityPolicy {
        required: NONE,
        strict: false,
        target_needed: false,
    };

    /// A map with only `header`, set to the Base64 of `json`.
    fn only(header: &'static str, json: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(header, HeaderValue::from_str(&encoded(json)).unwrap());
        map
    }

    fn lenient(map: &HeaderMap) -> IdentityHeaders {
        read_identity_headers(map, LENIENT).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn lenient_mode_reads_the_forms_the_proxy_routes() {
        let d = lenient(&only(
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":2000011147}"#,
        ));
        assert_eq!(
            d.target.unwrap().to_string(),
            "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
        );
        assert!(d.warnings.is_empty());
        for json in [
            r#"{"identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
            r#"{"resourceType":"Organization","identifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}}"#,
            r#"{"resourceType":"Organization","identifier":[{"system":"http://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
            r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organisation-code","value":"A1001"}]}"#,
            r#"{"identifier":{"system":"http://fhir.nhs.uk/Id/ods-organisation-code","value":"A1001"},"name":{"text":"x"}}"#,
        ] {
            let d = lenient(&only(NHSD_END_USER_ORGANISATION, json));
            assert_eq!(
                d.organisation.map(|o| o.ods_code.0).as_deref(),
                Some("A1001"),
                "{json}"
            );
            assert!(d.warnings.is_empty(), "{json}");
        }
        let d = lenient(&only(
            NHSD_END_USER_ORGANISATION,
            r#"{"identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":12345}]}"#,
        ));
        assert_eq!(d.organisation.unwrap().ods_code.as_str(), "12345");
        for json in [
            r#"{"identifier":{"system":"https://s/Id","value":"APP"},"deviceName":"N","version":"1"}"#,
            r#"{"resourceType":"Device","identifier":[{"system":"https://s/Id","value":"APP"}]}"#,
        ] {
            let d = lenient(&only(NHSD_REQUESTING_SOFTWARE, json));
            assert_eq!(
                d.software.unwrap().id.as_deref(),
                Some("https://s/Id|APP"),
                "{json}"
            );
        }
        let d = lenient(&only(
            NHSD_REQUESTING_PRACTITIONER,
            r#"{"identifier":{"value":555},"code":{"coding":[]}}"#,
        ));
        assert!(d.practitioner_present);
        assert!(d.warnings.is_empty());
    }

    #[test]
    fn lenient_mode_forwards_unexpected_shapes_with_a_warning_and_no_value() {
        let ods = ODS_ORGANIZATION_CODE_SYSTEM;
        let table: Vec<(&'static str, String, ShapeProblem)> = vec![
            (
                NHSD_TARGET_IDENTIFIER,
                r#"{"system":"s"}"#.into(),
                ShapeProblem::NoValue,
            ),
            (
                NHSD_TARGET_IDENTIFIER,
                r#"{"value":"v"}"#.into(),
                ShapeProblem::NoSystem,
            ),
            (
                NHSD_TARGET_IDENTIFIER,
                r#"{"system":"a|b","value":"v"}"#.into(),
                ShapeProblem::PipeInSystem,
            ),
            (
                NHSD_TARGET_IDENTIFIER,
                r#"{"system":"s","value":"v\n"}"#.into(),
                ShapeProblem::ControlCharacters,
            ),
            (
                NHSD_TARGET_IDENTIFIER,
                r#"["s","v"]"#.into(),
                ShapeProblem::NotAnObject,
            ),
            (
                NHSD_TARGET_IDENTIFIER,
                r#"{"system":"s","value":"v","value":"w"}"#.into(),
                ShapeProblem::DuplicateField,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                r#"{"identifier":[{"system":"https://other/Id","value":"A1"}]}"#.into(),
                ShapeProblem::NoOdsCode,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                format!(r#"{{"identifier":[{{"system":"{ods}","value":""}}]}}"#),
                ShapeProblem::NoOdsCode,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                format!(
                    r#"{{"resourceType":"Organisation","identifier":[{{"system":"{ods}","value":"A1"}}]}}"#
                ),
                ShapeProblem::WrongResourceType,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                format!(
                    r#"{{"identifier":[{{"system":"{ods}","value":"A1"}},{{"system":"{ods}","value":"B2"}}]}}"#
                ),
                ShapeProblem::SeveralOdsCodes,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                r#"{"identifier":"A1"}"#.into(),
                ShapeProblem::BadIdentifier,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                r#""A1""#.into(),
                ShapeProblem::NotAnObject,
            ),
            (
                NHSD_REQUESTING_SOFTWARE,
                r#"{"resourceType":"Device","identifier":[]}"#.into(),
                ShapeProblem::NoIdentifierValue,
            ),
            (
                NHSD_REQUESTING_SOFTWARE,
                r#"{"identifier":[{"system":{},"value":"A"}]}"#.into(),
                ShapeProblem::BadIdentifier,
            ),
            (
                NHSD_REQUESTING_PRACTITIONER,
                r#"{"resourceType":"Practitioner","identifier":[{"value":"1"}]}"#.into(),
                ShapeProblem::WrongResourceType,
            ),
        ];
        for (header, json, problem) in table {
            let d = lenient(&only(header, &json));
            assert_eq!(
                d.warnings,
                vec![IdentityWarning { header, problem }],
                "{header}: {json}"
            );
            assert_eq!(d.target, None, "{json}");
            assert_eq!(d.organisation, None, "{json}");
            assert_eq!(d.software, None, "{json}");
            assert!(!d.practitioner_present, "{json}");
        }
    }

    #[test]
    fn lenient_mode_still_refuses_what_is_not_base64_json() {
        for name in HEADERS {
            let mut map = HeaderMap::new();
            map.insert(name, HeaderValue::from_static("not base64!"));
            assert_malformed(
                read_identity_headers(&map, LENIENT),
                name,
                "is not valid Base64",
            );
            let map = only(name, r#"{"system":"s","#);
            assert_malformed(
                read_identity_headers(&map, LENIENT),
                name,
                "is not valid JSON",
            );
        }
        let mut map = only(NHSD_TARGET_IDENTIFIER, r#"{"system":"s","value":"v"}"#);
        let value = map[NHSD_TARGET_IDENTIFIER].clone();
        map.append(NHSD_TARGET_IDENTIFIER, value);
        assert_malformed(
            read_identity_headers(&map, LENIENT),
            NHSD_TARGET_IDENTIFIER,
            "sent more than once",
        );
    }

    #[test]
    fn a_target_needed_for_routing_is_refused_when_it_cannot_be_read() {
        let policy = IdentityPolicy {
            target_needed: true,
            ..LENIENT
        };
        assert_malformed(
            read_identity_headers(&only(NHSD_TARGET_IDENTIFIER, r#"{"system":"s"}"#), policy),
            NHSD_TARGET_IDENTIFIER,
            "value must be a non-empty string",
        );
        // Other headers stay lenient.
        let d = read_identity_headers(&only(NHSD_END_USER_ORGANISATION, "{}"), policy).unwrap();
        assert_eq!(d.warnings.len(), 1);
    }

    #[test]
    fn strict_mode_refuses_the_lenient_forms() {
        let table = [
            (
                NHSD_TARGET_IDENTIFIER,
                r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":2000011147}"#,
                "value must be a non-empty string",
            ),
            (
                NHSD_END_USER_ORGANISATION,
                r#"{"identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
                r#"resourceType must be "Organization""#,
            ),
            (
                NHSD_END_USER_ORGANISATION,
                r#"{"resourceType":"Organization","identifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}}"#,
                "identifier must be an array",
            ),
            (
                NHSD_END_USER_ORGANISATION,
                r#"{"resourceType":"Organization","identifier":[{"system":"http://fhir.nhs.uk/Id/ods-organization-code","value":"A1001"}]}"#,
                "identifier has no ODS organisation code",
            ),
            (
                NHSD_REQUESTING_SOFTWARE,
                r#"{"identifier":[{"value":"APP"}]}"#,
                r#"resourceType must be "Device""#,
            ),
        ];
        for (header, json, problem) in table {
            let result = decode_identity_headers(&only(header, json), NONE);
            assert_malformed(result, header, problem);
        }
    }

    #[test]
    fn the_memo_answers_for_the_mode_a_value_was_read_in() {
        let map = only(
            NHSD_TARGET_IDENTIFIER,
            r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":7}"#,
        );
        for _ in 0..2 {
            assert_eq!(lenient(&map).target.unwrap().value, "7");
            assert_malformed(
                decode_identity_headers(&map, NONE),
                NHSD_TARGET_IDENTIFIER,
                "value must be a non-empty string",
            );
        }
    }

    /// xorshift64: deterministic, no dependencies.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn byte_from(&mut self, alphabet: &[u8]) -> u8 {
            alphabet[self.below(alphabet.len())]
        }
    }

    fn mutate(rng: &mut Rng, input: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=rng.below(4) {
            let at = if out.is_empty() {
                0
            } else {
                rng.below(out.len())
            };
            match rng.below(6) {
                0 if !out.is_empty() => out[at] = rng.byte_from(alphabet),
                1 => out.insert(at, rng.byte_from(alphabet)),
                2 if !out.is_empty() => {
                    out.remove(at);
                }
                3 => out.truncate(at),
                4 => {
                    let end = (at + rng.below(16)).min(out.len());
                    let copy = out[at..end].to_vec();
                    let to = rng.below(out.len() + 1);
                    out.splice(to..to, copy);
                }
                _ if !out.is_empty() => out[at] ^= 1 << rng.below(8),
                _ => {}
            }
        }
        out
    }

    /// Decodes `value` as every header; any refusal must name the header it is about.
    fn decode_never_panics(value: &[u8]) {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return;
        };
        for name in HEADERS {
            let mut map = valid_headers();
            map.insert(name, value.clone());
            if let Err(refusal) = decode_identity_headers(&map, ALL) {
                assert!(refusal.to_string().starts_with(name), "{refusal}");
                assert_eq!(refusal.status(), 400);
            }
            // Lenient mode refuses less, never more, and warns only about the changed header.
            match read_identity_headers(&map, LENIENT) {
                Err(refusal) => {
                    assert!(refusal.to_string().starts_with(name), "{refusal}");
                    assert!(decode_identity_headers(&map, ALL).is_err());
                }
                Ok(decoded) => assert!(decoded.warnings.iter().all(|w| w.header == name)),
            }
        }
    }

    #[test]
    fn fuzzed_headers_never_panic_the_decoder() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let fixture = fixture();
        let encoded_values: Vec<String> = HEADERS
            .iter()
            .map(|name| {
                fixture["valid_process_message_request"]["headers"][name]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let json_texts: Vec<String> = HEADERS
            .iter()
            .map(|name| fixture["decoded"][name]["json"].to_string())
            .collect();
        let base64_alphabet =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \t!";
        let json_alphabet = b"{}[]\":,\\ \n0123456789.eE-+truefalsnul\x00\x7f\xc3\xa9\xff";
        for _ in 0..3000 {
            // Mutated Base64 text.
            let source = &encoded_values[rng.below(encoded_values.len())];
            decode_never_panics(&mutate(&mut rng, source.as_bytes(), base64_alphabet));
            // Mutated JSON, validly encoded: exercises the JSON and shape rules.
            let source = &json_texts[rng.below(json_texts.len())];
            decode_never_panics(
                STANDARD
                    .encode(mutate(&mut rng, source.as_bytes(), json_alphabet))
                    .as_bytes(),
            );
            // Random bytes, both raw and encoded.
            let random: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
            decode_never_panics(&random);
            decode_never_panics(STANDARD.encode(&random).as_bytes());
        }
    }
}
