//! The "Reference ID" of a processed request (BaRS Core 1.6: the 409 diagnostics name what the first
//! request created): from the answer's `Location` when there is one, else from the kept answer
//! body's resource id (the top-level `id` of a JSON resource, the root's `<id value="…"/>` of an XML
//! one). BaRS `$process-message` and POST answers normally carry no `Location`.
//!
//! Only a value that is a valid FHIR id (`[A-Za-z0-9\-\.]{1,64}`) is taken: the diagnostics never
//! echo anything else the legacy system sent.

/// The reference from the answer's `Location` header, else from its body; `None` when neither
/// has a valid FHIR id.
pub fn reference_of(location: Option<&http::HeaderValue>, body: &[u8]) -> Option<Box<str>> {
    location
        .and_then(|v| v.to_str().ok())
        .and_then(from_location)
        .or_else(|| from_body(body))
        .map(Into::into)
}

/// `…/ServiceRequest/123` or `…/ServiceRequest/123/_history/2` → `123`.
fn from_location(location: &str) -> Option<String> {
    let path = location.split(['?', '#']).next().unwrap_or(location);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let id = match segments.iter().position(|s| *s == "_history") {
        Some(i) if i > 0 => segments[i - 1],
        _ => *segments.last()?,
    };
    valid_id(id).then(|| id.to_string())
}

fn from_body(body: &[u8]) -> Option<String> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let id = match body[start] {
        b'{' => json_id(body)?,
        b'<' => xml_root_id(std::str::from_utf8(&body[start..]).ok()?)?,
        _ => return None,
    };
    valid_id(&id).then_some(id)
}

fn json_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct TopLevel {
        id: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<TopLevel>(body).ok()?.id? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

/// The `value` of the `<id>` element that is a direct child of the root element (a Bundle's
/// entries have ids of their own, one level deeper).
fn xml_root_id(text: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        rest = &rest[open..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = &after[after.find("-->")? + 3..];
            continue;
        }
        if rest.starts_with("<?") || rest.starts_with("<!") {
            rest = &rest[rest.find('>')? + 1..];
            continue;
        }
        let close = rest.find('>')?;
        let tag = &rest[1..close];
        rest = &rest[close + 1..];
        if tag.starts_with('/') {
            depth = depth.checked_sub(1)?;
            continue;
        }
        let self_closing = tag.ends_with('/');
        let name = tag
            .split(|c: char| c.is_ascii_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        let local = name.rsplit(':').next().unwrap_or(name);
        if depth == 1 && local == "id" {
            return attribute(tag, "value");
        }
        if !self_closing {
            depth += 1;
        }
    }
    None
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut rest = tag;
    while let Some(at) = rest.find(name) {
        let before_ok = at == 0 || rest.as_bytes()[at - 1].is_ascii_whitespace();
        let after = rest[at + name.len()..].trim_start();
        if before_ok {
            if let Some(after) = after.strip_prefix('=') {
                let after = after.trim_start();
                let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'')?;
                let value = &after[1..];
                return Some(value[..value.find(quote)?].to_string());
            }
        }
        rest = &rest[at + name.len()..];
    }
    None
}

/// FHIR's id datatype: `[A-Za-z0-9\-\.]{1,64}`.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn location(l: &'static str) -> HeaderValue {
        HeaderValue::from_static(l)
    }

    #[test]
    fn location_wins_and_its_history_suffix_is_skipped() {
        let body = br#"{"resourceType":"Bundle","id":"from-body"}"#;
        assert_eq!(
            reference_of(Some(&location("/ServiceRequest/ID-12345")), body).as_deref(),
            Some("ID-12345")
        );
        assert_eq!(
            reference_of(
                Some(&location("https://x/fhir/ServiceRequest/77/_history/3?y=1")),
                b""
            )
            .as_deref(),
            Some("77")
        );
    }

    #[test]
    fn the_json_body_top_level_id_is_taken_without_location() {
        let body = br#" {"resourceType":"Bundle","entry":[{"resource":{"id":"inner"}}],"id":"c5d2a6b9-1"}"#;
        assert_eq!(reference_of(None, body).as_deref(), Some("c5d2a6b9-1"));
    }

    #[test]
    fn the_xml_root_id_is_taken_not_a_nested_one() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment with <id value="no"/> -->
<Bundle xmlns="http://hl7.org/fhir">
  <meta><versionId value="1"/></meta>
  <entry><resource><MessageHeader><id value="nested"/></MessageHeader></resource></entry>
  <id value="bundle-42"/>
</Bundle>"#;
        assert_eq!(reference_of(None, body).as_deref(), Some("bundle-42"));
    }

    #[test]
    fn no_reference_when_neither_has_a_valid_id() {
        assert_eq!(reference_of(None, b""), None);
        assert_eq!(
            reference_of(None, br#"{"resourceType":"OperationOutcome"}"#),
            None
        );
        assert_eq!(
            reference_of(None, br#"{"id":"<script>alert(1)</script>"}"#),
            None,
            "never echoed unless it is a FHIR id"
        );
        assert_eq!(reference_of(None, b"<Bundle><x/></Bundle>"), None);
        assert_eq!(reference_of(None, b"not a resource"), None);
        assert_eq!(reference_of(Some(&location("/")), b""), None);
    }
}
