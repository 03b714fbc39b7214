//! The shape rules of each identity header, on the typed JSON `wire.rs` reads: what each one
//! must hold, what lenient mode also reads, and the diagnostic (never the content) when it is wrong.

use http::HeaderValue;

use super::wire::{
    parse_object, with_decoded_json, Array, IdentifierJson, Kind, Object, OrganisationJson,
    PractitionerJson, SoftwareJson, TargetJson, Text,
};
use super::{
    refused, shape, EndUserOrganisation, OdsCode, Problem, RequestingSoftware, Shape,
    TargetIdentifier, NHSD_END_USER_ORGANISATION, NHSD_REQUESTING_PRACTITIONER,
    NHSD_REQUESTING_SOFTWARE, NHSD_TARGET_IDENTIFIER, ODS_ORGANIZATION_CODE_SYSTEM,
};
use crate::bars::warnings::ShapeProblem;

pub(super) fn decode_target(
    value: &HeaderValue,
    strict: bool,
) -> Result<TargetIdentifier, Problem> {
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

pub(super) fn decode_organisation(
    value: &HeaderValue,
    strict: bool,
) -> Result<EndUserOrganisation, Problem> {
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

pub(super) fn decode_software(
    value: &HeaderValue,
    strict: bool,
) -> Result<RequestingSoftware, Problem> {
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

pub(super) fn decode_practitioner(value: &HeaderValue, strict: bool) -> Result<(), Problem> {
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
