//! Request ids: reads and checks `X-Request-Id` and `X-Correlation-Id` (BARS-CONTEXT.md "Headers").

use std::fmt;

use http::{HeaderMap, HeaderName};
use uuid::Uuid;

use crate::bars::errors::Refusal;
use crate::bars::headers::{CORRELATION_ID_KEY, REQUEST_ID_KEY};
pub use crate::bars::headers::{X_CORRELATION_ID, X_REQUEST_ID};

/// One network request's id: BaRS uses it to de-duplicate repeated requests (IG "Transactional
/// integrity"), so it is the dedup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub Uuid);

/// One business conversation's id, shared by many requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CorrelationId(pub Uuid);

impl fmt::Display for RequestId {
    /// Lower-case hyphenated form, e.g. `c1ab3fba-6bae-4ba4-b257-5a87c44d4a91`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Display for CorrelationId {
    /// Lower-case hyphenated form, e.g. `9562466f-c982-4bd5-bb0e-255e9f5e6689`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// The two ids every BaRS request carries and every response echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestIds {
    /// `X-Request-Id`.
    pub request_id: RequestId,
    /// `X-Correlation-Id`.
    pub correlation_id: CorrelationId,
}

/// Reads both ids, `X-Request-Id` first (the order the BaRS proxy checks them in).
///
/// Both are required UUIDs (BARS-CONTEXT.md "Headers"). Only the RFC 4122 hyphenated text form is
/// accepted, in either case: the simple, braced and `urn:uuid:` forms that `Uuid::parse_str` also
/// takes would let one id be spelled several ways, and senders never use them.
pub fn read_request_ids(headers: &HeaderMap) -> Result<RequestIds, Refusal> {
    let request_id = RequestId(read_uuid_header(headers, &REQUEST_ID_KEY, X_REQUEST_ID)?);
    let correlation_id = CorrelationId(read_uuid_header(
        headers,
        &CORRELATION_ID_KEY,
        X_CORRELATION_ID,
    )?);
    Ok(RequestIds {
        request_id,
        correlation_id,
    })
}

/// Reads one header that must hold exactly one hyphenated UUID.
fn read_uuid_header(
    headers: &HeaderMap,
    key: &HeaderName,
    name: &'static str,
) -> Result<Uuid, Refusal> {
    let mut values = headers.get_all(key).iter();
    let Some(value) = values.next() else {
        return Err(Refusal::MissingHeader { header: name });
    };
    // Two values would make the dedup key ambiguous: refuse rather than pick one.
    if values.next().is_some() {
        return Err(Refusal::malformed(name, "sent more than once"));
    }
    let bytes = value.as_bytes();
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(Refusal::malformed(name, "must be visible ASCII"));
    }
    parse_hyphenated_uuid(bytes)
        .ok_or_else(|| Refusal::malformed(name, "is not a UUID (8-4-4-4-12 hexadecimal digits)"))
}

/// Parses exactly `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits in either case).
fn parse_hyphenated_uuid(text: &[u8]) -> Option<Uuid> {
    if text.len() != 36 {
        return None;
    }
    let mut bytes = [0u8; 16];
    let mut nibbles = 0usize;
    for (i, &c) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let nibble = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        bytes[nibbles / 2] |= if nibbles % 2 == 0 {
            nibble << 4
        } else {
            nibble
        };
        nibbles += 1;
    }
    Some(Uuid::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const REQUEST: &str = "c1ab3fba-6bae-4ba4-b257-5a87c44d4a91";
    const CORRELATION: &str = "9562466f-c982-4bd5-bb0e-255e9f5e6689";

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    fn assert_malformed(result: Result<RequestIds, Refusal>, header: &str) {
        let refusal = result.unwrap_err();
        assert!(
            matches!(refusal, Refusal::MalformedHeader { header: h, .. } if h == header),
            "{refusal:?}"
        );
        assert_eq!(refusal.status(), 400);
        assert_eq!(refusal.issue_code(), "value");
        assert!(refusal.to_string().contains(header), "{refusal}");
    }

    #[test]
    fn spec_example_ids_are_read() {
        let ids = read_request_ids(&headers(&[
            ("x-request-id", REQUEST.as_bytes()),
            ("x-correlation-id", CORRELATION.as_bytes()),
        ]))
        .unwrap();
        assert_eq!(ids.request_id.to_string(), REQUEST);
        assert_eq!(ids.correlation_id.to_string(), CORRELATION);
        assert_eq!(ids.request_id.0, Uuid::parse_str(REQUEST).unwrap());
    }

    #[test]
    fn upper_case_uuid_is_accepted_and_displayed_lower_case() {
        let ids = read_request_ids(&headers(&[
            ("x-request-id", REQUEST.to_uppercase().as_bytes()),
            ("x-correlation-id", CORRELATION.to_uppercase().as_bytes()),
        ]))
        .unwrap();
        assert_eq!(ids.request_id.to_string(), REQUEST);
        assert_eq!(ids.correlation_id.to_string(), CORRELATION);
    }

    #[test]
    fn missing_request_id_is_reported_before_missing_correlation_id() {
        let refusal = read_request_ids(&HeaderMap::new()).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::MissingHeader {
                header: X_REQUEST_ID
            }
        );
        assert_eq!(refusal.status(), 400);
        assert_eq!(refusal.issue_code(), "invalid");
        assert!(refusal.to_string().contains("X-Request-Id"));
    }

    #[test]
    fn missing_correlation_id_is_refused() {
        let refusal =
            read_request_ids(&headers(&[("x-request-id", REQUEST.as_bytes())])).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::MissingHeader {
                header: X_CORRELATION_ID
            }
        );
        assert!(refusal.to_string().contains("X-Correlation-Id"));
    }

    #[test]
    fn non_hyphenated_uuid_forms_are_refused() {
        let bad: &[&[u8]] = &[
            b"c1ab3fba6bae4ba4b2575a87c44d4a91",
            b"{c1ab3fba-6bae-4ba4-b257-5a87c44d4a91}",
            b"urn:uuid:c1ab3fba-6bae-4ba4-b257-5a87c44d4a91",
            b"c1ab3fba-6bae-4ba4-b257-5a87c44d4a9",
            b"c1ab3fba-6bae-4ba4-b257-5a87c44d4a911",
            b"c1ab3fb-a6bae-4ba4-b257-5a87c44d4a91",
            b"c1ab3fba_6bae_4ba4_b257_5a87c44d4a91",
            b"g1ab3fba-6bae-4ba4-b257-5a87c44d4a91",
            b"c1ab3fba-6bae-4ba4-b257-5a87c44d4a9+",
            b"",
            b"not-a-uuid",
            b" c1ab3fba-6bae-4ba4-b257-5a87c44d4a91",
            "c1ab3fba-6bae-4ba4-b257-5a87c44d4a9\u{e9}".as_bytes(),
            b"c1ab3fba-6bae-4ba4-b257-5a87c44d4a9\t",
        ];
        for value in bad {
            let result = read_request_ids(&headers(&[
                ("x-request-id", value),
                ("x-correlation-id", CORRELATION.as_bytes()),
            ]));
            assert_malformed(result, X_REQUEST_ID);
            let result = read_request_ids(&headers(&[
                ("x-request-id", REQUEST.as_bytes()),
                ("x-correlation-id", value),
            ]));
            assert_malformed(result, X_CORRELATION_ID);
        }
    }

    #[test]
    fn request_id_sent_twice_is_refused() {
        let result = read_request_ids(&headers(&[
            ("x-request-id", REQUEST.as_bytes()),
            ("x-request-id", REQUEST.as_bytes()),
            ("x-correlation-id", CORRELATION.as_bytes()),
        ]));
        assert_malformed(result.clone(), X_REQUEST_ID);
        assert!(result.unwrap_err().to_string().contains("more than once"));
    }

    #[test]
    fn correlation_id_sent_twice_is_refused() {
        let result = read_request_ids(&headers(&[
            ("x-request-id", REQUEST.as_bytes()),
            ("x-correlation-id", CORRELATION.as_bytes()),
            ("x-correlation-id", REQUEST.as_bytes()),
        ]));
        assert_malformed(result, X_CORRELATION_ID);
    }

    #[test]
    fn diagnostics_do_not_echo_the_value() {
        let refusal =
            read_request_ids(&headers(&[("x-request-id", b"secret-patient-data")])).unwrap_err();
        assert!(!refusal.to_string().contains("secret"), "{refusal}");
    }

    #[test]
    fn every_uuid_round_trips_through_the_parser() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1000 {
            let mut bytes = [0u8; 16];
            for chunk in bytes.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            let uuid = Uuid::from_bytes(bytes);
            let text = uuid.hyphenated().to_string();
            assert_eq!(parse_hyphenated_uuid(text.as_bytes()), Some(uuid));
            assert_eq!(
                parse_hyphenated_uuid(text.to_uppercase().as_bytes()),
                Some(uuid)
            );
        }
    }
}
