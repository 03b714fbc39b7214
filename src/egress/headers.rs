//! Completes the BaRS headers of a legacy system's request (DESIGN.md §5b): the ids kept or made,
//! the target taken or encoded, Organisation and Software from config unless sent, `Accept` and
//! `Content-Type` defaulted. Whatever the legacy system sent goes through the same decoders as on
//! the way in, so a malformed header is refused here (400) rather than by the BaRS API.

use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{
    ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::settings::EgressSettings;
use crate::bars::errors::Refusal;
use crate::bars::identity::{
    decode_identity_headers, IdentityRequirements, TargetIdentifier, ODS_ORGANIZATION_CODE_SYSTEM,
};
use crate::bars::ids::{read_request_ids, RequestIds};

/// `X-BaRS-Target: system|value`: the plain form of NHSD-Target-Identifier a legacy system may send.
pub(crate) static X_BARS_TARGET: HeaderName = HeaderName::from_static("x-bars-target");
/// `X-BaRS-Attempts`: on the answer, how many attempts the gateway made.
pub(crate) static X_BARS_ATTEMPTS: HeaderName = HeaderName::from_static("x-bars-attempts");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
static NHSD_TARGET: HeaderName = HeaderName::from_static("nhsd-target-identifier");
static NHSD_ORGANISATION: HeaderName = HeaderName::from_static("nhsd-end-user-organisation");
static NHSD_SOFTWARE: HeaderName = HeaderName::from_static("nhsd-requesting-software");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The header values built once from `[egress]`.
#[derive(Debug, Clone)]
pub(crate) struct HeaderDefaults {
    organisation: Option<HeaderValue>,
    software: HeaderValue,
    media_type: HeaderValue,
}

impl HeaderDefaults {
    /// Encodes the configured Organisation and Software as the BaRS spec's Base64 JSON.
    pub(crate) fn new(settings: &EgressSettings) -> HeaderDefaults {
        let organisation = settings.ods_code.as_ref().map(|code| {
            let mut org = serde_json::json!({
                "resourceType": "Organization",
                "identifier": [{"system": ODS_ORGANIZATION_CODE_SYSTEM, "value": code}],
            });
            if let Some(name) = &settings.organisation_name {
                org["name"] = name.clone().into();
            }
            encode(&org)
        });
        let identifier = match settings.device_id.split_once('|') {
            Some((system, value)) => serde_json::json!({"system": system, "value": value}),
            None => serde_json::json!({"value": settings.device_id}),
        };
        let software = encode(&serde_json::json!({
            "resourceType": "Device",
            "identifier": [identifier],
            "deviceName": {"name": settings.software_name, "type": "manufacturer-name"},
            "version": {"value": settings.software_version},
        }));
        // Safe: bars_version is validated as dotted digits.
        let media_type = HeaderValue::from_str(&format!(
            "application/fhir+json; version={}",
            settings.bars_version
        ))
        .unwrap_or(HeaderValue::from_static("application/fhir+json"));
        HeaderDefaults {
            organisation,
            software,
            media_type,
        }
    }
}

fn encode(value: &serde_json::Value) -> HeaderValue {
    // Safe: standard Base64 is visible ASCII.
    HeaderValue::from_str(&STANDARD.encode(value.to_string()))
        .unwrap_or(HeaderValue::from_static(""))
}

/// The request headers to send, and what the answer and the audit record need from them.
#[derive(Debug, Clone)]
pub(crate) struct Completed {
    /// Headers for the BaRS API (no `Authorization` yet: that is per attempt).
    pub headers: HeaderMap,
    /// The ids used, sent or generated.
    pub ids: RequestIds,
    /// The service addressed.
    pub target: TargetIdentifier,
}

/// Completes `incoming` (the legacy system's headers) for the BaRS API; a header the legacy system
/// sent that is malformed is refused as on the way in (400).
pub(crate) fn complete_headers(
    incoming: &HeaderMap,
    defaults: &HeaderDefaults,
    has_body: bool,
) -> Result<Completed, Refusal> {
    let mut headers = incoming.clone();
    // Hop-by-hop headers and those named in Connection belong to the legacy system's connection.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_str(n.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &HOST,
        &CONTENT_LENGTH,
        // The gateway authenticates; a legacy system's own credentials never leave.
        &AUTHORIZATION,
        &X_BARS_ATTEMPTS,
    ] {
        headers.remove(name);
    }
    // Ids: kept when sent (and then validated like on the way in), generated otherwise.
    for name in [&X_REQUEST_ID, &X_CORRELATION_ID] {
        if !headers.contains_key(name) {
            let id = uuid::Uuid::new_v4().hyphenated().to_string();
            // Safe: a hyphenated UUID is a valid header value.
            headers.insert(
                name.clone(),
                HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("")),
            );
        }
    }
    let ids = read_request_ids(&headers)?;
    // Target: NHSD-Target-Identifier as the spec has it, or X-BaRS-Target `system|value`.
    if let Some(plain) = headers.remove(&X_BARS_TARGET) {
        if headers.contains_key(&NHSD_TARGET) {
            return Err(Refusal::InvalidRequest(
                "Send either X-BaRS-Target or NHSD-Target-Identifier, not both".into(),
            ));
        }
        let target = plain
            .to_str()
            .ok()
            .and_then(|t| TargetIdentifier::from_str(t.trim()).ok())
            .ok_or(Refusal::MalformedHeader {
                header: "X-BaRS-Target",
                problem: "expected system|value".into(),
            })?;
        headers.insert(
            NHSD_TARGET.clone(),
            encode(&serde_json::json!({"system": target.system, "value": target.value})),
        );
    }
    if !headers.contains_key(&NHSD_ORGANISATION) {
        if let Some(org) = &defaults.organisation {
            headers.insert(NHSD_ORGANISATION.clone(), org.clone());
        }
    }
    if !headers.contains_key(&NHSD_SOFTWARE) {
        headers.insert(NHSD_SOFTWARE.clone(), defaults.software.clone());
    }
    let identity = decode_identity_headers(
        &headers,
        IdentityRequirements {
            target: true,
            organisation: false,
            software: false,
        },
    )?;
    let target = identity.target.ok_or(Refusal::MissingHeader {
        header: "NHSD-Target-Identifier",
    })?;
    if !headers.contains_key(ACCEPT) {
        headers.insert(ACCEPT, defaults.media_type.clone());
    }
    if has_body && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, defaults.media_type.clone());
    }
    Ok(Completed {
        headers,
        ids,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> HeaderDefaults {
        let raw: super::super::settings::RawEgress = toml::from_str(
            "environment = \"sandbox\"\nods_code = \"A1001\"\norganisation_name = \"Trust\"",
        )
        .unwrap();
        let v = crate::config::Validator {
            file: "c.toml".into(),
            dir: ".".into(),
        };
        let s = super::super::settings::validate(raw, &v).unwrap();
        HeaderDefaults::new(&s)
    }

    fn with(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_str(n).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ids_are_generated_and_the_plain_target_is_encoded() {
        let c = complete_headers(
            &with(&[
                (
                    "x-bars-target",
                    "https://fhir.nhs.uk/Id/dos-service-id|2000011147",
                ),
                ("authorization", "Basic x"),
            ]),
            &defaults(),
            true,
        )
        .unwrap();
        assert_eq!(c.target.value, "2000011147");
        assert_eq!(c.ids.request_id.0.get_version_num(), 4);
        assert!(c.headers.get("authorization").is_none());
        assert!(c.headers.get("x-bars-target").is_none());
        assert!(c.headers.contains_key("nhsd-end-user-organisation"));
        assert!(c.headers.contains_key("nhsd-requesting-software"));
        assert_eq!(c.headers["accept"], "application/fhir+json; version=1.1.0");
        assert_eq!(
            c.headers["content-type"],
            "application/fhir+json; version=1.1.0"
        );
        // What the gateway built passes its own receiver-side decoders.
        let decoded = decode_identity_headers(
            &c.headers,
            IdentityRequirements {
                target: true,
                organisation: true,
                software: true,
            },
        )
        .unwrap();
        assert_eq!(decoded.organisation.unwrap().ods_code.as_str(), "A1001");
        assert_eq!(
            decoded.software.unwrap().id.as_deref(),
            Some("bars-gateway")
        );
    }

    #[test]
    fn sent_headers_are_validated() {
        let target = ("x-bars-target", "s|v");
        for (pairs, header) in [
            (vec![target, ("x-request-id", "not-a-uuid")], "X-Request-Id"),
            (
                vec![target, ("x-correlation-id", "123")],
                "X-Correlation-Id",
            ),
            (
                vec![target, ("nhsd-end-user-organisation", "%%%")],
                "NHSD-End-User-Organisation",
            ),
            (vec![("x-bars-target", "no-bar")], "X-BaRS-Target"),
        ] {
            let e = complete_headers(&with(&pairs), &defaults(), false).unwrap_err();
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{pairs:?}");
            assert!(e.to_string().contains(header), "{e}");
        }
        let e = complete_headers(&with(&[]), &defaults(), false).unwrap_err();
        assert!(e.to_string().contains("NHSD-Target-Identifier"), "{e}");
    }
}
