//! The one place a [`Refusal`] becomes an HTTP response: a UK Core OperationOutcome in the
//! caller's format (BaRS allows `application/fhir+json` and `application/fhir+xml`), with its
//! status, `Content-Type` and, for a 405, `Allow`.
//!
//! The XML is written here rather than by an XML crate: the document has a fixed shape and five
//! text values, so all it needs is attribute escaping (FHIR XML puts every primitive in a `value`
//! attribute). `tests/bars_headers.rs` parses it with fhir.resources' XML parser.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::Response;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use crate::bars::errors::{Refusal, ERROR_CODE_SYSTEM, OPERATION_OUTCOME_PROFILE};
use crate::upstream::GatewayBody;

/// The FHIR format of the gateway's own answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `application/fhir+json` (the default).
    #[default]
    Json,
    /// `application/fhir+xml`, when the caller prefers it (see `bars::accept::response_format`).
    Xml,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/fhir+json",
            Format::Xml => "application/fhir+xml",
        }
    }
}

/// The refusal as the HTTP response the client gets (the ids are echoed by the caller).
pub fn refusal_response(refusal: &Refusal, format: Format) -> Response<GatewayBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(operation_outcome(refusal, format)))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = refusal.status();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Some(allow) = refusal.allow().and_then(|a| HeaderValue::from_str(a).ok()) {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}

/// The OperationOutcome's values, taken once from the refusal table.
struct Fields {
    id: String,
    issue_code: &'static str,
    code: &'static str,
    display: String,
    diagnostics: String,
}

impl Fields {
    fn of(refusal: &Refusal) -> Fields {
        let outcome = refusal.outcome();
        Fields {
            id: uuid::Uuid::new_v4().to_string(),
            issue_code: outcome.issue_code,
            code: outcome.bars_code,
            display: format!("{} - {}", outcome.status.as_u16(), outcome.bars_code),
            diagnostics: refusal.to_string(),
        }
    }
}

/// The refusal as a UK Core OperationOutcome document with a fresh `id`, in `format`.
pub fn operation_outcome(refusal: &Refusal, format: Format) -> Vec<u8> {
    match format {
        // Serialising a `Value` of strings cannot fail.
        Format::Json => serde_json::to_vec(&operation_outcome_json(refusal)).unwrap_or_default(),
        Format::Xml => operation_outcome_xml(&Fields::of(refusal)).into_bytes(),
    }
}

/// The JSON form, as a value (BARS-CONTEXT.md "Errors").
pub(crate) fn operation_outcome_json(refusal: &Refusal) -> Value {
    let f = Fields::of(refusal);
    json!({
        "resourceType": "OperationOutcome",
        "id": f.id,
        "meta": { "profile": [OPERATION_OUTCOME_PROFILE] },
        "issue": [{
            "severity": "error",
            "code": f.issue_code,
            "details": { "coding": [{
                "system": ERROR_CODE_SYSTEM,
                "code": f.code,
                "display": f.display,
            }]},
            "diagnostics": f.diagnostics,
        }]
    })
}

/// The XML form: the same elements in FHIR R4's order (Resource.id, meta; issue.severity, code,
/// details, diagnostics; Coding.system, code, display).
fn operation_outcome_xml(f: &Fields) -> String {
    let mut xml = String::with_capacity(640 + f.diagnostics.len());
    xml.push_str(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    xml.push_str(r#"<OperationOutcome xmlns="http://hl7.org/fhir">"#);
    element(&mut xml, "id", &f.id);
    xml.push_str("<meta>");
    element(&mut xml, "profile", OPERATION_OUTCOME_PROFILE);
    xml.push_str("</meta><issue>");
    element(&mut xml, "severity", "error");
    element(&mut xml, "code", f.issue_code);
    xml.push_str("<details><coding>");
    element(&mut xml, "system", ERROR_CODE_SYSTEM);
    element(&mut xml, "code", f.code);
    element(&mut xml, "display", &f.display);
    xml.push_str("</coding></details>");
    element(&mut xml, "diagnostics", &f.diagnostics);
    xml.push_str("</issue></OperationOutcome>");
    xml
}

/// `<name value="..."/>` with the value escaped for a double-quoted attribute.
fn element(xml: &mut String, name: &str, value: &str) {
    xml.push('<');
    xml.push_str(name);
    xml.push_str(r#" value=""#);
    for c in value.chars() {
        match c {
            '&' => xml.push_str("&amp;"),
            '<' => xml.push_str("&lt;"),
            '>' => xml.push_str("&gt;"),
            '"' => xml.push_str("&quot;"),
            // Attribute-value normalisation would turn these into spaces: keep them as they are.
            '\t' => xml.push_str("&#9;"),
            '\n' => xml.push_str("&#10;"),
            '\r' => xml.push_str("&#13;"),
            // Not allowed in XML 1.0 at all (diagnostics never contain them; be safe anyway).
            c if c.is_control() => xml.push('\u{FFFD}'),
            c => xml.push(c),
        }
    }
    xml.push_str(r#""/>"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_outcome_carries_the_table_values_in_fhir_order() {
        let refusal = Refusal::MethodNotAllowed {
            allow: "POST".into(),
        };
        let xml = String::from_utf8(operation_outcome(&refusal, Format::Xml)).unwrap();
        let order = [
            "<OperationOutcome xmlns=\"http://hl7.org/fhir\">",
            "<id value=\"",
            "<meta><profile value=\"https://fhir.hl7.org.uk/StructureDefinition/UKCore-OperationOutcome\"/></meta>",
            "<issue><severity value=\"error\"/>",
            "<code value=\"not-supported\"/>",
            "<details><coding><system value=\"https://fhir.nhs.uk/CodeSystem/http-error-codes\"/>",
            "<code value=\"REC_METHOD_NOT_ALLOWED\"/>",
            "<display value=\"405 - REC_METHOD_NOT_ALLOWED\"/></coding></details>",
            "<diagnostics value=\"Method not allowed on this endpoint; allowed: POST\"/>",
            "</issue></OperationOutcome>",
        ];
        let mut at = 0;
        for part in order {
            let found = xml[at..]
                .find(part)
                .unwrap_or_else(|| panic!("{part} after {at} in {xml}"));
            at += found + part.len();
        }
    }

    #[test]
    fn xml_attribute_values_are_escaped() {
        let mut xml = String::new();
        element(&mut xml, "diagnostics", "a & <b> \"c\" 'd'\n\u{1}");
        assert_eq!(
            xml,
            "<diagnostics value=\"a &amp; &lt;b&gt; &quot;c&quot; 'd'&#10;\u{FFFD}\"/>"
        );
    }

    #[test]
    fn response_has_the_status_content_type_and_allow_of_the_refusal() {
        let refusal = Refusal::MethodNotAllowed {
            allow: "GET, POST".into(),
        };
        for format in [Format::Json, Format::Xml] {
            let response = refusal_response(&refusal, format);
            assert_eq!(response.status(), 405);
            assert_eq!(response.headers()[CONTENT_TYPE], format.content_type());
            assert_eq!(response.headers()[ALLOW], "GET, POST");
        }
        let response = refusal_response(&Refusal::NotFound, Format::Xml);
        assert_eq!(response.status(), 404);
        assert!(response.headers().get(ALLOW).is_none());
    }
}
